"""Run by tests/test_ddp.py: the tiny shapes LDM trained for a few steps either by 2 CPU processes (DDP, gloo) at
batch B or by 1 process at batch 2B, with `noise_seed` and the learning rate scaled as main.py's --scale_lr does.

    python tests/ddp_lr_worker.py OUT AE_CKPT DEVICES BATCH [STRATEGY]

STRATEGY: ddp (default) or fsdp (ldm.parallel.FSDP) for 2 devices.

Each rank writes its weights, EMA buffers and scale_factor to OUT/rank<r>.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddp_worker import Dump  # noqa: E402  (tests/, this script's folder)
from ldm.data.shapes import ShapesDataset  # noqa: E402
from ldm.parallel import FSDP  # noqa: E402
from ldm.util import instantiate_from_config, load_config  # noqa: E402


def main() -> None:
    out, ae, devices, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    strategy = sys.argv[5] if len(sys.argv) > 5 else "ddp"
    pl.seed_everything(0)  # also the seed of the DistributedSampler Lightning gives the 2 ranks (PL_GLOBAL_SEED)
    cfg = load_config(ROOT / "configs/ldm/shapes_txt2img.yaml")
    p = cfg.model.params
    p.first_stage_config.params.ckpt_path = ae
    p.unet_config.params.model_channels, p.unet_config.params.num_head_channels = 32, 16
    p.noise_seed, p.ucg_rate, p.scheduler_config = 11, 0.3, None
    model = instantiate_from_config(cfg.model)
    model.learning_rate = cfg.model.base_learning_rate * batch * devices  # main.py's --scale_lr on one node
    data = ShapesDataset(num_samples=48)
    # the order Lightning's DistributedSampler gives 2 ranks (seed 0), here for 1 process: the same global batches
    sampler = (torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0) if devices == 1
               else None)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=sampler is None, sampler=sampler)
    if devices == 1:
        strategy = "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=FSDP() if strategy == "fsdp" else strategy,
                         max_steps=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Dump(out)], limit_val_batches=0)
    trainer.fit(model, loader)


if __name__ == "__main__":
    main()
