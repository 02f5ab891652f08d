"""Run by tests/test_buckets.py: 2 CPU processes (DDP, gloo) train a one-weight module for 2 epochs on a bucketed
image folder through DataModuleFromConfig; each rank writes what it was given to OUT/rank<r>.pt."""
from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.data.datamodule import DataModuleFromConfig  # noqa: E402


class Recorder(pl.LightningModule):
    def __init__(self, out: Path):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.out, self.seen = out, []

    def training_step(self, batch, batch_idx):
        self.seen.append({"epoch": self.current_epoch, "captions": list(batch["caption"]),
                          "shape": tuple(batch["image"].shape), "sizes": batch["target_size_as_tuple"].tolist()})
        return (self.w * batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        torch.save(self.seen, self.out / f"rank{self.global_rank}.pt")


def main() -> None:
    out, root = Path(sys.argv[1]), sys.argv[2]
    dm = DataModuleFromConfig(batch_size=2, num_workers=0, train={
        "target": "ldm.data.buckets.BucketedImageCaptions", "params": {"root": root, "resolution": 64, "step": 16}})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(Recorder(out), datamodule=dm)


if __name__ == "__main__":
    main()
