"""Test setup: offline environment, tests/ importable (config targets of test helpers), tiny-config helpers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny shapes text-to-image run trained 2 steps through main.py (scripts and notebooks sample it)."""
    import glob

    import main as main_mod
    from safetensors.torch import save_file
    from ldm.util import instantiate_from_config, load_config
    tmp = tmp_path_factory.mktemp("run")
    ae = instantiate_from_config(load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml").model)
    save_file(ae.state_dict(), str(tmp / "ae.safetensors"))
    rc = main_mod.main(["--base", str(ROOT / "configs/ldm/shapes_txt2img.yaml"), "-t", "-n", "tiny", "-l", str(tmp),
                        f"model.params.first_stage_config.params.ckpt_path={tmp / 'ae.safetensors'}",
                        "model.params.unet_config.params.model_channels=32",
                        "model.params.unet_config.params.num_head_channels=16", "data.params.batch_size=4",
                        "data.params.train.params.dataset.params.num_samples=16",
                        f"data.params.train.params.cache_dir={tmp / 'cache'}", "data.params.validation.params.num_samples=4",
                        "lightning.trainer.max_steps=2", "lightning.trainer.enable_progress_bar=false"])
    assert rc == 0
    return Path(glob.glob(str(tmp / "*_tiny"))[0])
