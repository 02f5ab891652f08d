"""Run by tests/test_ddp.py: a tiny shapes LDM trained for a few steps on 2 CPU processes (DDP, gloo).

Each rank writes its scale_factor, EMA buffers and model weights to OUT/rank<r>.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.data.shapes import ShapesDataset  # noqa: E402
from ldm.util import instantiate_from_config, load_config  # noqa: E402


class Dump(pl.Callback):
    def __init__(self, out: str | Path):
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        def whole(sd: dict) -> dict:  # FSDP's shards gathered (a collective: every rank calls it in the same order)
            return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in sd.items()}

        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"scale_factor": pl_module.scale_factor.clone(), "ema": whole(pl_module.model_ema.state_dict()),
                    "weights": whole(pl_module.model.state_dict()), "steps": trainer.global_step,
                    "sharded": any(isinstance(p, DTensor) for p in pl_module.model.parameters())},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out, ae = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/ldm/shapes_txt2img.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = ae
    u = cfg.model.params.unet_config.params
    u.model_channels, u.num_head_channels = 32, 16
    model = instantiate_from_config(cfg.model)
    model.learning_rate = 1e-3
    # each rank sees different images, so the pooled latent std differs from any single rank's
    ds = ShapesDataset(num_samples=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, accumulate_grad_batches=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Dump(out)], limit_val_batches=0)
    trainer.fit(model, loader)


if __name__ == "__main__":
    main()
