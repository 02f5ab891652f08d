"""What the models read of the Trainer they run under, through Lightning's public properties only."""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl


def attached_trainer(module: pl.LightningModule) -> Optional[pl.Trainer]:
    """The Trainer `module` is attached to, or None (Lightning's `trainer` property raises when there is none)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def training_batches_started(trainer: Optional[pl.Trainer]) -> int:
    """Training batches begun over all epochs (the current one counted inside a training step), restored on resume;
    0 without a Trainer."""
    return 0 if trainer is None else trainer.fit_loop.total_batch_idx + 1
