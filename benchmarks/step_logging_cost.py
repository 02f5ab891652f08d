"""Benchmark: what logging a training step's scalars costs, in one Trainer run alternating step by step (issue 25).

    python benchmarks/step_logging_cost.py [--steps 400] [--batch 2]

The shapes text-to-image LDM (UNet width 32, a random autoencoder) trains `--steps` steps; even steps log their
scalars as if every step were read, odd steps only where a logger or the progress bar reads them
(`ldm.callbacks.step_scalars_read`, the default). Prints the median and mean time of `training_step` for each, after
20 steps. Alternating in one process keeps the machine's drift out of the difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger
    from test_step_speed import tiny_txt2img_config  # the tests' small config on a random autoencoder

    import ldm.models.diffusion.diffusion_module as dm
    from ldm.data.shapes import ShapesDataset
    from ldm.util import instantiate_from_config
    tmp = Path(tempfile.mkdtemp(prefix="ldm_logcost_"))
    model = instantiate_from_config(tiny_txt2img_config(tmp).model)
    model.learning_rate = 1e-4
    gated, times = dm.step_scalars_read, {"every step": [], "where read": []}
    training_step = type(model).training_step

    def timed_step(self, batch, idx):
        every = idx % 2 == 0
        dm.step_scalars_read = (lambda trainer: True) if every else gated
        t0 = time.perf_counter()
        out = training_step(self, batch, idx)
        if self.global_step >= 20:
            times["every step" if every else "where read"].append(1000 * (time.perf_counter() - t0))
        return out
    type(model).training_step = timed_step
    loader = torch.utils.data.DataLoader(ShapesDataset(num_samples=args.steps * args.batch), batch_size=args.batch)
    trainer = pl.Trainer(accelerator="cpu", max_steps=args.steps, logger=CSVLogger(tmp, name="logcost"),
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         limit_val_batches=0, log_every_n_steps=50)
    trainer.fit(model, loader)
    for name, t in times.items():
        print(f"scalars logged {name}: training_step median {statistics.median(t):.2f} ms, "
              f"mean {statistics.mean(t):.2f} ms ({len(t)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
