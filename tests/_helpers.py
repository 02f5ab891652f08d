"""Config targets used by the tests (importable as `_helpers.X`)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from ldm.modules.model_inputs import ConditionInput


class FailingDataset(Dataset):
    """Shapes-like items that raise once `fail_at` items have been read (an error mid-training)."""

    def __init__(self, fail_at: int = 10, size: int = 32, num_samples: int = 1000):
        self.fail_at, self.size, self.length, self.reads = fail_at, size, num_samples, 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        if self.reads > self.fail_at:
            raise RuntimeError("injected failure in the data pipeline")
        rng = np.random.default_rng(i)
        return {"image": rng.uniform(-1, 1, (self.size, self.size, 3)).astype(np.float32)}


class Plain:
    """A target taking two keyword arguments."""

    def __init__(self, a: int, b: int = 2):
        self.a, self.b = a, b


def tiny_sd_v1_config(tmp_path, monkeypatch):
    """configs/stable-diffusion/v1-inference.yaml at tiny width, a tiny CLIP text encoder in a private HF cache under
    the real repo name (openai/clip-vit-large-patch14)."""
    from pathlib import Path

    from ldm.util import load_config
    from test_pretrained import clip_in_cache
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    clip_in_cache(tmp_path, "openai/clip-vit-large-patch14", tmp_path, seed=0)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/stable-diffusion/v1-inference.yaml")
    u, fs = cfg.model.params.unet_config.params, cfg.model.params.first_stage_config.params
    u.model_channels, u.num_heads, u.context_dim, u.use_checkpoint = 32, 2, 32, False
    fs.ddconfig.ch = 32
    return cfg


def perturb(module, seed: int = 0, scale: float = 0.05) -> None:
    """Weights moved away from initialisation (a fresh UNet's output layers are zero: any two paths would agree)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))


def tiny_sd2(name: str):
    """An SD2 config at tiny width; the OpenCLIP text encoder replaced by an identity over given token states."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from ldm.util import load_config
    cfg = load_config(Path(__file__).resolve().parents[1] / f"configs/stable-diffusion/{name}.yaml")
    p = cfg.model.params
    u = p.unet_config.params
    u.model_channels, u.context_dim, u.use_checkpoint = 32, 16, False
    u.channel_mult = [1, 2]
    u.attention_resolutions = [1, 2]
    u.num_res_blocks = 1
    if "disable_self_attentions" in u:
        u.disable_self_attentions = [True, False]
    if u.get("num_head_channels", -1) not in (-1, None):
        u.num_head_channels = 16
    else:
        u.num_heads = 2
    fs = p.first_stage_config.params.ddconfig
    fs.ch, fs.num_res_blocks, fs.resolution = 16, 1, 32
    p.cond_stage_config = OmegaConf.create({"target": "ldm.modules.encoders.modules.IdentityEncoder"})
    return cfg


class SeedProbe:
    """A Lightning callback (main.py config target) writing each rank's training seed, checkpoint
    folder and data-order seed to OUT/rank<r>.json."""

    def __new__(cls, out: str):
        import json
        from pathlib import Path

        import pytorch_lightning as pl
        import torch

        class _Probe(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps({"seed": torch.initial_seed(), "ckpt_dir": str(trainer.checkpoint_callback.dirpath),
                                "data_seed": trainer.train_dataloader.sampler.seed}))

        return _Probe()


def _has_ninja() -> bool:
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return shutil.which("ninja") is not None


# the CPU kernels (ldm.modules.cpu_kernels) are built by the tests that need them
needs_compiler = pytest.mark.skipif((shutil.which("c++") is None and shutil.which("g++") is None) or not _has_ninja(),
                                    reason="no C++ compiler or ninja to build the CPU kernels")


class PooledTextStandIn(torch.nn.Module):
    """A second text encoder of SDXL's shape at tiny width: token states (B, T, D) and a pooled vector (B, D), as
    sgm's FrozenOpenCLIPEmbedder2 with always_return_pooled. Built on the framework's BERTEmbedder (no weights to
    download); the pooled vector is the first token's state, projected."""

    condition_input = ConditionInput.PROMPTS

    def __init__(self, n_embed: int = 12, max_seq_len: int = 8):
        super().__init__()
        from ldm.modules.encoders.modules import BERTEmbedder

        self.text = BERTEmbedder(n_embed=n_embed, n_layer=1, max_seq_len=max_seq_len, n_heads=2)
        self.pool = torch.nn.Linear(n_embed, n_embed)

    def forward(self, text):
        tokens = self.text(text)
        return tokens, self.pool(tokens[:, 0])
