"""What keeps a training step fast: subnormals flushed on the CPU, and no host round trip inside a step (the GPU's
launch-bound small-model step pays one per `.item()` and per host number copied to the device; here made visible on
the CPU by counting them)."""
from __future__ import annotations

import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]

# Tensor methods that hand a value to the host: on a GPU each waits for every queued kernel.
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# Functions whose host reads are not per step: condition dropout of a caption list draws on the host
# (GlobalBatchRandom.rand_host) and reads the draws there; the frozen text encoder runs (inside transformers) only on
# a caption it has not cached yet
HOST_SIDE = {("tolist", "drop_conditions"), ("__bool__", "_encode_batch")}


def test_subnormals_are_flushed_in_every_thread_only_when_asked():
    if not torch.set_flush_denormal(True):  # this process's main thread only; undone below
        pytest.skip("this CPU cannot flush subnormals (torch.set_flush_denormal is not supported)")
    torch.set_flush_denormal(False)
    code = ("import torch\nfrom ldm.precision import denormals_flushed, flush_denormals\n"
            "torch.set_num_threads(2)\nimport sys\nflag = sys.argv[1] == 'on'\n"
            "ok = flush_denormals() if flag else True\n"
            "x = torch.full((1 << 20,), torch.finfo(torch.float32).tiny / 8)\n"
            "print(ok, denormals_flushed(), int((x * 1.0 == 0).sum()))")
    on = subprocess.run([sys.executable, "-c", code, "on"], cwd=ROOT, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code, "off"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True", str(1 << 20)]  # every element, whichever thread computed it
    assert off.stdout.split() == ["True", "False", "0"]


def test_main_flushes_subnormals_by_default_and_keeps_them_on_request():
    import main
    assert main.get_parser().parse_args([]).flush_denormals is True
    assert main.get_parser().parse_args(["--flush_denormals", "false"]).flush_denormals is False


class _SyncCounter:
    """Counts, while armed, the host reads of tensors and the host numbers made into tensors on a device (ours,
    Lightning's, any library's; except HOST_SIDE's). On a GPU the second is a copy from pageable memory, which
    waits for every queued kernel too (`torch.tensor(0.5, device="cuda")`; Lightning's `self.log` of a float)."""

    def __init__(self, monkeypatch):
        self.armed, self.sites = False, []
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _orig=original, _name=name, **k):
                if self.armed:
                    self._record(_name)
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapper)
        original_tensor = torch.tensor

        def tensor(data, *a, **k):
            if self.armed and k.get("device") is not None and isinstance(data, (bool, int, float)):
                self._record("tensor")
            return original_tensor(data, *a, **k)
        monkeypatch.setattr(torch, "tensor", tensor)

    def _record(self, name: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if not any((name, f.name) in HOST_SIDE for f in stack):
            caller = next(f for f in reversed(stack) if "/torch/" not in f.filename)
            self.sites.append(f"{name} in {caller.name} ({Path(caller.filename).name}:{caller.lineno})")


def tiny_txt2img_config(tmp_path: Path):
    """The shapes text-to-image config at UNet width 32, on a random autoencoder saved in `tmp_path`."""
    from safetensors.torch import save_file
    ae = instantiate_from_config(load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml").model)
    save_file(ae.state_dict(), str(tmp_path / "ae.safetensors"))
    cfg = load_config(ROOT / "configs/ldm/shapes_txt2img.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = str(tmp_path / "ae.safetensors")
    u = cfg.model.params.unet_config.params
    u.model_channels, u.num_head_channels = 32, 16
    cfg.model.params.noise_seed = 5  # the global-batch draws (DDP-split independent), on the model's device
    return cfg


@pytest.mark.minilm
def test_training_steps_do_not_wait_for_the_host(tmp_path, monkeypatch):
    import pytorch_lightning as pl

    from ldm.callbacks import LogWhereRead, bounded_progress_bar
    from ldm.data.shapes import ShapesDataset
    cfg = tiny_txt2img_config(tmp_path)
    model = instantiate_from_config(cfg.model)
    model.learning_rate = 1e-4
    counter = _SyncCounter(monkeypatch)

    class Arm(pl.Callback):  # the second epoch: scale_by_std's factor set and every caption's encoding cached
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counter.armed = trainer.current_epoch >= 1

        def on_train_epoch_end(self, trainer, pl_module):  # so the bar's on_train_batch_end is counted too
            counter.armed = False

    data = ShapesDataset(num_samples=16)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                         enable_model_summary=False,  # main.py's logging gate and progress bar
                         callbacks=[Arm(), LogWhereRead(), bar := bounded_progress_bar()],
                         limit_val_batches=0, log_every_n_steps=50)
    trainer.fit(model, loader)
    assert trainer.global_step == 8  # 4 steps counted, logging every 50
    assert counter.sites == [], f"host round trips inside training steps: {sorted(set(counter.sites))}"
    assert "loss" in bar.get_metrics(trainer, model)  # the loss still reaches the bar: shown as last read
    bar._shown = {}  # as at a refresh step: read now
    assert float(bar.get_metrics(trainer, model)["loss"]) == pytest.approx(float(trainer.callback_metrics["loss"]),
                                                                          rel=1e-3)


@pytest.mark.minilm
def test_main_py_callbacks_do_not_wait_for_the_host(tmp_path, monkeypatch):
    """The same count over main.py's trainer as it builds it: its default callbacks (checkpoints, image logger,
    learning-rate monitor, signal and final checkpoints, progress bar) and CSV logger, at steps that write no log."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

    import main
    from ldm.callbacks import FinalCheckpoint, ImageLogger
    from ldm.data.shapes import ShapesDataset
    cfg = tiny_txt2img_config(tmp_path)
    lightning_config = cfg.pop("lightning")
    lightning_config.trainer.max_steps = 8
    model = instantiate_from_config(cfg.model)
    model.learning_rate = 1e-4
    counter = _SyncCounter(monkeypatch)

    class Arm(pl.Callback):  # as above: the second epoch, after the bar's and the loggers' first-step reads
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counter.armed = trainer.current_epoch >= 1

        def on_train_epoch_end(self, trainer, pl_module):
            counter.armed = False

    logdir = tmp_path / "run"
    kwargs = main.build_trainer_kwargs(lightning_config, cfg, model, str(logdir), str(logdir / "checkpoints"),
                                       str(logdir / "configs"), "now", resume=False)
    kinds = (ModelCheckpoint, ImageLogger, LearningRateMonitor, ProgressBar, FinalCheckpoint)
    assert all(any(isinstance(c, k) for c in kwargs["callbacks"]) for k in kinds), kwargs["callbacks"]
    kwargs.update(accelerator="cpu", limit_val_batches=0, callbacks=[Arm(), *kwargs["callbacks"]])
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model, torch.utils.data.DataLoader(ShapesDataset(num_samples=16), batch_size=4))
    assert trainer.global_step == 8 and trainer.log_every_n_steps > 8
    assert counter.sites == [], f"host round trips inside main.py's steps: {sorted(set(counter.sites))}"


def _fit_counting_logs(cfg, tmp_path: Path, monkeypatch, run: str, every_step: bool, key: str,
                       step_of, max_steps: int) -> tuple[list[int], str]:
    """Trains `cfg.model` on shapes with a CSV logger writing every 3 steps; the steps (`step_of(module)`) at which
    `key` was logged, and the CSV file. `every_step`: without main.py's LogWhereRead callback (the module logs
    every step)."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from ldm.callbacks import LogWhereRead
    from ldm.data.shapes import ShapesDataset
    monkeypatch.undo()
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    model.learning_rate = 1e-4
    logged_at, original = [], type(model).log

    def counting_log(self, name, *a, **k):  # log_dict passes `name` by keyword
        if name == key:
            logged_at.append(step_of(self))
        return original(self, name, *a, **k)
    monkeypatch.setattr(type(model), "log", counting_log)
    loader = torch.utils.data.DataLoader(ShapesDataset(num_samples=28), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(tmp_path, name=run),
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         limit_val_batches=0, log_every_n_steps=3, callbacks=[] if every_step else [LogWhereRead()])
    trainer.fit(model, loader)
    return logged_at, (Path(trainer.logger.log_dir) / "metrics.csv").read_text()


@pytest.mark.minilm
def test_step_scalars_logged_only_where_read_and_loggers_see_the_same_values(tmp_path, monkeypatch):
    """A training step logs its scalars on the steps a logger writes (every log_every_n_steps), the progress bar
    reads, and the first; the CSV logger's file is the same as when every step logs."""
    cfg = tiny_txt2img_config(tmp_path)
    runs = [_fit_counting_logs(cfg, tmp_path, monkeypatch, name, every, "loss", lambda m: m.trainer.global_step, 7)
            for name, every in (("every", True), ("read", False))]
    (every, every_csv), (read, read_csv) = runs
    assert every == list(range(7))
    assert read == [0, 2, 5]  # the first step, and the two Lightning writes (steps 3 and 6, counted from 1)
    assert "train/loss_simple" in read_csv.splitlines()[0] and len(read_csv.splitlines()) == 3
    assert read_csv == every_csv


def test_autoencoder_logs_only_where_read_and_loggers_see_the_same_values(tmp_path, monkeypatch):
    """The autoencoder's training step (two optimizers once its discriminator starts) gates its scalars the same
    way: logged on the first batch and where Lightning writes, and the CSV logger's file is unchanged."""
    cfg = load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml")
    cfg.model.params.lossconfig.params.disc_start = 3  # the discriminator's optimizer steps from batch 3 on
    # 11 optimizer steps: batches 0-2 one each, then two per batch
    runs = [_fit_counting_logs(cfg, tmp_path, monkeypatch, name, every, "aeloss",
                               lambda m: m.batches_seen, 11) for name, every in (("every", True), ("read", False))]
    (every, every_csv), (read, read_csv) = runs
    assert every == list(range(7))
    assert read == [0, 2, 5]
    assert "train/disc_loss" in read_csv.splitlines()[0]
    assert read_csv == every_csv
