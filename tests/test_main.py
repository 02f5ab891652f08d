"""main.py end to end at tiny size: run dir layout, resume at the saved step, bad input, save on exception."""
from __future__ import annotations

import glob
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import main as main_mod
from ldm.callbacks import CheckpointOnSignal

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs/autoencoder/shapes_kl_f4.yaml")
TINY = ["model.params.ddconfig.ch=8", "model.params.ddconfig.ch_mult=[1,2]", "model.params.lossconfig.params.disc_ndf=8",
        "data.params.batch_size=4", "data.params.train.params.num_samples=64",
        "data.params.validation.params.num_samples=8", "lightning.trainer.val_check_interval=2",
        "lightning.callbacks.image_logger.params.batch_frequency=2", "lightning.trainer.enable_progress_bar=false"]


def run(args, logdir):
    return main_mod.main(args + ["-l", str(logdir)])


def test_train_then_resume_continues_at_saved_step(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert run(["--base", CFG, "-t", "-n", "tiny", "lightning.trainer.max_steps=4"] + TINY, tmp_path) == 0
    runs = sorted(glob.glob(str(tmp_path / "*_tiny")))
    assert len(runs) == 1
    rd = Path(runs[0])
    assert len(list((rd / "configs").glob("*-project.yaml"))) == 1
    assert len(list((rd / "configs").glob("*-lightning.yaml"))) == 1
    assert (rd / "checkpoints" / "last.ckpt").is_file()
    assert list((rd / "images" / "train").glob("reconstructions_gs-*.png"))
    assert list((rd / "images" / "val").glob("inputs_gs-*.png"))
    assert (rd / "csv" / "metrics.csv").is_file()
    ck = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 4 and ck["ldm_batches_seen"] == 4
    w4 = ck["state_dict"]["decoder.conv_out.weight"]
    # resume: the config is restored from the run dir; only the new max_steps is given. Run files are named by the
    # second: start the resumed run in a later one, so that its config copy gets its own name
    time.sleep(max(0.0, 1.05 - (time.time() % 1.0)))
    assert run(["-r", str(rd), "-t", "lightning.trainer.max_steps=7", "lightning.trainer.enable_progress_bar=false"],
               tmp_path) == 0
    ck = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 7 and ck["ldm_batches_seen"] == 7
    assert "optimizer_states" in ck  # the final save at step 7 (FinalCheckpoint) holds what a resume needs
    # and says what it saves: no "`weights_only` was not set, defaulting to `False`" from Lightning
    assert not [r.getMessage() for r in caplog.records if "weights_only" in r.getMessage()]
    assert not torch.equal(w4, ck["state_dict"]["decoder.conv_out.weight"])
    assert len(list((rd / "configs").glob("*-project.yaml"))) == 2  # the resumed run wrote its own copy
    # the resumed config kept the tiny overrides from the first run
    assert "ch: 8" in sorted((rd / "configs").glob("*-project.yaml"))[-1].read_text()


def test_two_ddp_processes_print_the_lr_line_once_and_draw_noise_under_their_own_seeds(tmp_path):
    """main.py on 2 CPU processes (DDP, gloo): the learning-rate line, with both devices in it, is printed by rank 0
    only; every rank trains under seed + rank (the model is built under --seed before that)."""
    import json
    import subprocess
    import sys
    probe = tmp_path / "probe"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"),
                                                                   os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "main.py"), "--base", CFG, "-t", "-n", "ddp", "-l", str(tmp_path), "-s", "7",
           "lightning.trainer.max_steps=2", "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2",
           "lightning.trainer.strategy=ddp", "lightning.callbacks.probe.target=_helpers.SeedProbe",
           f"lightning.callbacks.probe.params.out={probe}"] + TINY
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Setting learning rate") == 1
    assert "1 (num_nodes) * 2 (devices per node) * 4 (batchsize)" in proc.stdout
    seen = {r: json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)}
    assert seen[0]["seed"] == 7 and seen[1]["seed"] == 8
    assert seen[0]["data_seed"] == seen[1]["data_seed"] == 7  # one data order: the ranks read disjoint parts of it
    # one run directory; Lightning hands rank 0's checkpoint folder to rank 1
    assert seen[0]["ckpt_dir"] == seen[1]["ckpt_dir"] and len(glob.glob(str(tmp_path / "*_ddp"))) == 1


def test_bad_yaml_and_missing_keys_exit_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  target: [unclosed\n")
    assert run(["--base", str(bad), "-t"], tmp_path) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line" in err
    cfg = str(ROOT / "configs/autoencoder/autoencoder_kl_f8.yaml")
    assert run(["--base", cfg, "-t"], tmp_path) == 2
    assert "data.params.train.params.root" in capsys.readouterr().err
    assert run(["--base", str(ROOT / "configs/ldm/txt2img.yaml"), "-t"], tmp_path) == 2
    err = capsys.readouterr().err
    assert "data.params.train.params.root" in err and "model.params.cond_stage_config.params.version" in err
    assert run(["--base", CFG, "-t", "model.target=ldm.models.autoencoder.Nope"], tmp_path) == 2
    err = capsys.readouterr().err
    assert "model.target" in err and "Nope" in err
    assert run(["-r", str(tmp_path / "missing_run")], tmp_path) == 2


def test_exception_during_training_saves_checkpoint(tmp_path):
    args = ["--base", CFG, "-t", "-n", "boom", "lightning.trainer.max_steps=50",
            "data.params.train.target=_helpers.FailingDataset", "data.params.train.params={fail_at: 24}"] + TINY
    with pytest.raises(RuntimeError, match="injected failure"):
        run(args, tmp_path)
    rd = Path(glob.glob(str(tmp_path / "*_boom"))[0])
    ck = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < ck["global_step"] < 50


def test_checkpoint_on_sigusr1(tmp_path):
    saved = []

    class FakeTrainer:
        def save_checkpoint(self, path, weights_only=None):
            saved.append((path, weights_only))

    cb = CheckpointOnSignal(str(tmp_path / "last.ckpt"))
    cb.on_fit_start(None, None)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        cb.on_train_batch_end(FakeTrainer(), None, None, None, 0)
    finally:
        cb.on_fit_end(None, None)
    assert saved == [(str(tmp_path / "last.ckpt"), False)]  # a full checkpoint: the run resumes from it


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_other_loggers_offline(tmp_path, logger, monkeypatch):
    pytest.importorskip(logger, reason=f"{logger} is not installed here")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run(["--base", CFG, "-t", "-n", logger, "lightning.trainer.max_steps=2", f"lightning.logger={logger}"] + TINY,
               tmp_path) == 0
    rd = Path(glob.glob(str(tmp_path / f"*_{logger}"))[0])
    assert (rd / ("tensorboard" if logger == "tensorboard" else "wandb")).is_dir()


def test_scale_lr_is_on_by_default_and_prints_formula(tmp_path, capsys):
    """CompVis scales by default (the paper configs' base_learning_rate assume it); old code did not."""
    assert run(["--base", CFG, "-n", "lr", "model.base_learning_rate=2e-3"] + TINY, tmp_path) == 0
    out = capsys.readouterr().out
    assert ("Setting learning rate to 8.00e-03 = 1 (accumulate_grad_batches) * 1 (num_nodes) * 1 (devices per node) * "
            "4 (batchsize)") in out
    assert run(["--base", CFG, "-n", "lr2", "--scale_lr", "false", "model.base_learning_rate=2e-3"] + TINY, tmp_path) == 0
    out = capsys.readouterr().out
    assert "NOT USING LR SCALING" in out and "Setting learning rate to 2.00e-03" in out
    assert main_mod.get_parser().parse_args(["--scale_lr"]).scale_lr is True


def test_compvis_import_paths():
    import main
    from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModel, VQModelInterface  # noqa: F401
    from ldm.modules.losses import LPIPSWithDiscriminator  # noqa: F401
    from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator  # noqa: F401
    from ldm.modules.diffusionmodules.model import Decoder, Encoder  # noqa: F401
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution  # noqa: F401
    assert callable(main.DataModuleFromConfig) and callable(main.ImageLogger)


def test_ddp_allows_the_unused_discriminator(tmp_path):
    """An autoencoder's discriminator is unused before disc_start: ddp gets unused-parameter detection."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config, load_config
    cfg = load_config(CFG)
    ae = instantiate_from_config(cfg.model)
    kw = lambda trainer: main_mod.build_trainer_kwargs(  # noqa: E731
        OmegaConf.create({"trainer": trainer}), cfg, ae, str(tmp_path), str(tmp_path / "ckpt"), str(tmp_path / "cfg"),
        "now", False)
    assert kw({"strategy": "ddp", "devices": 2})["strategy"] == "ddp_find_unused_parameters_true"
    assert kw({"devices": 2, "accelerator": "cpu"})["strategy"] == "ddp_find_unused_parameters_true"
    assert "strategy" not in kw({"devices": 1})
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match="AutoencoderKL has none; train it with strategy: ddp"):
        kw({"strategy": "fsdp", "devices": 2})  # FSDP (ldm.parallel) shards diffusion models' UNets only
