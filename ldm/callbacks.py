"""Lightning callbacks of `main.py`: run-dir setup, image grids, checkpoint-on-signal."""
from __future__ import annotations

import csv
import logging
import os
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from ldm.runs import RunDir

logger = logging.getLogger(__name__)


class SetupCallback(pl.Callback):
    """Creates the run directory and writes `<now>-project.yaml` / `<now>-lightning.yaml` on rank 0."""

    def __init__(self, resume: bool, now: str, logdir: str, ckptdir: str, cfgdir: str, config, lightning_config):
        super().__init__()
        self.resume, self.now = resume, now
        self.logdir, self.ckptdir, self.cfgdir = logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank != 0:
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(d, exist_ok=True)
        layout = RunDir(self.logdir)  # the file names of the layout, in the configured cfgdir
        OmegaConf.save(self.config, os.path.join(self.cfgdir, layout.project_config(self.now).name))
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       os.path.join(self.cfgdir, layout.lightning_config(self.now).name))


class ContinuedCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing a run's metrics.csv (its columns kept) where Lightning's deletes it."""

    def _check_log_dir_exists(self) -> None:  # Lightning's hook that removes an existing metrics.csv
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = list(next(csv.reader(fh), []))


class RunCSVLogger(CSVLogger):
    """CSVLogger that never deletes a run's metrics: a resumed run appends to its metrics.csv."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuedCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedCSVWriter(log_dir=self.log_dir)
        return self._experiment


class ImageLogger(pl.Callback):
    """Saves `pl_module.log_images(batch)` grids to `<logdir>/images/{train,val}/` at a batch frequency."""

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: Optional[dict] = None, log_val: bool = True,
                 enable_autocast: bool = True):
        super().__init__()
        # SD2: log_images under float16 autocast on CUDA (reduced-precision sampling is only for speed there)
        self.enable_autocast = enable_autocast
        self.batch_freq, self.max_images = max(1, int(batch_frequency)), max_images
        self.rescale, self.clamp, self.disabled = rescale, clamp, disabled
        self.log_on_batch_idx, self.log_first_step = log_on_batch_idx, log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.log_val = log_val
        self.log_steps = [2 ** n for n in range(int(np.log2(self.batch_freq)) + 1)] if increase_log_steps else []
        self._val_logged_epoch = -1

    @rank_zero_only
    def log_local(self, save_dir: str, split: str, images: dict, global_step: int, current_epoch: int,
                  batch_idx: int) -> list[str]:
        root = Path(save_dir) / "images" / split
        root.mkdir(parents=True, exist_ok=True)
        written = []
        for k, img in images.items():
            grid = torchvision.utils.make_grid(img, nrow=4)
            if self.rescale:
                grid = (grid + 1.0) / 2.0
            grid = grid.permute(1, 2, 0).squeeze(-1).numpy()
            grid = (np.clip(grid, 0, 1) * 255).astype(np.uint8)
            path = root / f"{k}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            Image.fromarray(grid).save(path)
            written.append(str(path))
        return written

    def _save_dir(self, trainer: pl.Trainer) -> str:
        lg = trainer.logger
        # Lightning loggers nest versions; the run dir is where SetupCallback wrote the configs.
        for cb in trainer.callbacks:
            if isinstance(cb, SetupCallback):
                return cb.logdir
        return lg.save_dir if lg is not None else trainer.default_root_dir

    def log_img(self, pl_module: pl.LightningModule, batch, batch_idx: int, split: str = "train") -> None:
        if not hasattr(pl_module, "log_images") or not callable(pl_module.log_images) or self.max_images <= 0:
            return
        was_training = pl_module.training
        if was_training:
            pl_module.eval()
        device_type = pl_module.device.type
        autocast = self.enable_autocast and device_type == "cuda"  # float16 speeds up only CUDA sampling
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.float16, enabled=autocast):
            images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        for k in list(images):
            img = images[k]
            if not isinstance(img, torch.Tensor):
                images.pop(k)
                continue
            img = img[: min(img.shape[0], self.max_images)].detach().float().cpu()
            if img.dim() == 4 and img.shape[1] not in (1, 3):
                img = img[:, :3]
            images[k] = torch.clamp(img, -1.0, 1.0) if self.clamp else img
        trainer = pl_module.trainer
        self.log_local(self._save_dir(trainer), split, images, pl_module.global_step, pl_module.current_epoch, batch_idx)
        if was_training:
            pl_module.train()

    def check_frequency(self, check_idx: int) -> bool:
        if (check_idx % self.batch_freq == 0 or check_idx in self.log_steps) and (check_idx > 0 or self.log_first_step):
            if check_idx in self.log_steps:
                self.log_steps.remove(check_idx)
            return True
        return False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.disabled:
            return
        idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if self.check_frequency(idx):
            self.log_img(pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if self.disabled or not self.log_val or trainer.sanity_checking:
            return
        if batch_idx == 0 and self._val_logged_epoch != trainer.current_epoch * 10 ** 9 + pl_module.global_step:
            self._val_logged_epoch = trainer.current_epoch * 10 ** 9 + pl_module.global_step
            self.log_img(pl_module, batch, batch_idx, split="val")


class CheckpointOnSignal(pl.Callback):
    """On SIGUSR1 (e.g. a cluster's pre-emption notice) save `last.ckpt` at the next batch boundary."""

    def __init__(self, ckpt_path: str, sig: int = signal.SIGUSR1):
        super().__init__()
        self.ckpt_path, self.sig = ckpt_path, sig
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True
        logger.warning("signal %s received: a checkpoint will be written to %s", signum, self.ckpt_path)

    def on_fit_start(self, trainer, pl_module) -> None:
        try:
            self._previous = signal.signal(self.sig, self._handler)
        except ValueError:  # not in the main thread
            self._previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.requested:
            self.requested = False
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # with the optimizer: a run resumes from it
            logger.warning("checkpoint written to %s", self.ckpt_path)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._previous is not None:
            signal.signal(self.sig, self._previous)


class FinalCheckpoint(pl.Callback):
    """Write `last.ckpt` when training ends at a step no checkpoint holds yet (e.g. max_steps between two validations,
    where ModelCheckpoint saves), so that the last steps are never lost."""

    def __init__(self, ckpt_path: str):
        super().__init__()
        self.ckpt_path = ckpt_path
        self.saved_step: Optional[int] = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and self.saved_step != trainer.global_step:
            # every rank takes part (FSDP gathers); rank 0 writes the file, with the optimizer so a run resumes from it
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
            if trainer.global_rank == 0:
                logger.info("training ended at step %d: checkpoint written to %s", trainer.global_step, self.ckpt_path)


class RankSeed(pl.Callback):
    """Per-rank seeding: every rank builds the model under `seed` (the same initial weights); once training starts
    (after Lightning's DDP set-up has re-seeded every rank with `seed`), rank r draws its noise, timesteps and
    condition dropout under seed + r, so that ranks do not repeat each other's noise. The data order is left alone:
    Lightning seeds its DistributedSampler from the run's seed, the same on every rank."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = int(seed)

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.global_rank:
            import random
            seed = self.seed + trainer.global_rank
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)


class StepTimer(pl.Callback):
    """Wall time per optimizer step after `warmup` steps (start-up and first-batch compilation excluded): the mean
    (validation, checkpoints and image logging included) and the median (the step itself). Logged at the end of
    training and, with `out`, written there as JSON (benchmarks read it)."""

    def __init__(self, warmup: int = 20, out: Optional[str] = None):
        super().__init__()
        self.warmup, self.out = int(warmup), out
        self.times: list[float] = []
        self.result: Optional[dict] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.warmup:
            self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if len(self.times) < 2:
            logger.info("StepTimer: training ended before %d warm-up steps; nothing timed", self.warmup)
            return
        gaps = np.diff(np.asarray(self.times)) * 1000
        self.result = {"steps": len(gaps), "ms_per_step": float(gaps.mean()), "median_ms": float(np.median(gaps)),
                       "warmup": self.warmup}
        logger.info("StepTimer: %.1f ms per step (median %.1f) over %d steps", self.result["ms_per_step"],
                    self.result["median_ms"], len(gaps))
        if trainer.is_global_zero and self.out:
            import json
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(self.result))


def epoch_description(trainer: pl.Trainer, epoch: int) -> str:
    """'Epoch e/last' with the last epoch from max_epochs or max_steps (whichever stops first); with only a
    max_time bound, the time limit instead (Lightning's bars print 'Epoch e/-2' when max_epochs is -1)."""
    import math
    from datetime import timedelta

    from pytorch_lightning.callbacks import Timer
    last = []
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        last.append(trainer.max_epochs - 1)
    batches = trainer.num_training_batches
    if trainer.max_steps is not None and trainer.max_steps > 0 and batches not in (None, 0, float("inf")):
        steps_per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        last.append(math.ceil(trainer.max_steps / steps_per_epoch) - 1)
    if last:
        return f"Epoch {epoch}/{min(last)}"
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and timer._duration is not None:
        return f"Epoch {epoch} (stops after {timedelta(seconds=int(timer._duration))})"
    return f"Epoch {epoch}"


# Steps between progress-bar updates: each update reads the logged loss on the host, which on a GPU waits for the
# queued step (Lightning's default, 1, puts that wait in every step of a small, launch-bound model).
PROGRESS_REFRESH_STEPS = 10


def step_scalars_read(trainer: Optional[pl.Trainer], optimizer_steps: int = 1) -> bool:
    """Whether a training step's logged scalars will be read: by the loggers (Lightning writes every
    `log_every_n_steps`), by the progress bar (every `refresh_rate` steps), or on the first step. Logging them on the
    other steps only costs host time: each `self.log` runs Lightning's result bookkeeping in Python (0.3-1.3 ms
    measured), which a small model's step pays on the CPU and, on a GPU, ahead of its kernel launches.

    Asked before the step's optimizer steps: `optimizer_steps` is how many it takes (the global step the progress
    bar reads after it moves by that many; 2 for an autoencoder whose discriminator trains too)."""
    if trainer is None or trainer.global_step == 0:
        return True
    try:
        if trainer._logger_connector.should_update_logs:  # Lightning's own test (private: a fallback below)
            return True
    except AttributeError:
        return True
    bar = trainer.progress_bar_callback
    rate = getattr(bar, "refresh_rate", 0) or PROGRESS_REFRESH_STEPS
    return bar is not None and (trainer.global_step + optimizer_steps) % rate == 0


class LogWhereRead(pl.Callback):
    """Tells the module before each training batch whether that step's logged scalars will be read
    (`step_scalars_read`), as its `log_scalars_now`; the module asks nothing of the trainer itself. Without this
    callback a module logs every step."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        steps = pl_module.optimizer_steps_next() if hasattr(pl_module, "optimizer_steps_next") else 1
        pl_module.log_scalars_now = step_scalars_read(trainer, optimizer_steps=steps)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log_scalars_now = True


def bounded_progress_bar(refresh_rate: int = PROGRESS_REFRESH_STEPS) -> pl.Callback:
    """Lightning's progress bar (rich when installed, else tqdm) with `epoch_description` as the epoch label, updated
    every `refresh_rate` steps."""
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
    from pytorch_lightning.utilities.imports import _RICH_AVAILABLE

    class TrainingLosses:
        """Adds the module's `progress_bar_keys` from the callback metrics, read on the host every `refresh_rate`
        steps (Lightning's prog_bar=True would read them after every step)."""
        _shown: dict[str, str] = {}
        _read_at: int = -1

        def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
            items = super().get_metrics(trainer, pl_module)
            step = trainer.global_step
            if step != self._read_at and (step % refresh_rate == 0 or not self._shown):
                self._read_at = step
                self._shown = {k: f"{float(v):.4g}" for k in getattr(pl_module, "progress_bar_keys", ())
                               if isinstance(v := trainer.callback_metrics.get(k), torch.Tensor) and v.numel() == 1}
            return {**items, **self._shown}

    class BoundedRichProgressBar(TrainingLosses, RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            text = epoch_description(self.trainer, current_epoch)
            return f"{text:{len(self.validation_description)}}"

    class BoundedTQDMProgressBar(TrainingLosses, TQDMProgressBar):
        def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(epoch_description(trainer, trainer.current_epoch))

    return (BoundedRichProgressBar(refresh_rate=refresh_rate) if _RICH_AVAILABLE
            else BoundedTQDMProgressBar(refresh_rate=refresh_rate))
