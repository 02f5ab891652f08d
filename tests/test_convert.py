"""Checkpoint export: safetensors / CompVis .ckpt round trips are bit-exact; fp16 / bf16, EMA-only, training parts
stripped; on weights perturbed away from their initialisation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_checkpoint
from ldm.convert.export import ema_shadow_name, export_checkpoint
from ldm.util import instantiate_from_config, load_config, load_model_from_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)


@pytest.fixture
def ldm_model(tmp_path):
    cfg = load_config(ROOT / "configs/ldm/shapes_uncond.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = None
    cfg.model.params.unet_config.params.model_channels = 32
    OmegaConf.save(cfg, tmp_path / "ldm.yaml")
    model = instantiate_from_config(cfg.model)
    _perturb(model.model, 1)
    _perturb(model.model_ema, 2)  # EMA copies differ from the training weights
    _perturb(model.first_stage_model, 3)
    return model, tmp_path / "ldm.yaml"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_is_bit_exact(ldm_model, tmp_path, suffix):
    model, cfg = ldm_model
    path = export_checkpoint(model, tmp_path / f"m{suffix}")
    back = load_model_from_config(cfg, path)
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_ema_only_puts_the_ema_weights_in_place(ldm_model, tmp_path):
    model, cfg = ldm_model
    sd = model.state_dict()
    path = export_checkpoint(model, tmp_path / "ema.safetensors", ema_only=True)
    exported = load_checkpoint(path)["state_dict"]
    assert not any(k.startswith("model_ema.") for k in exported)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(exported[key], sd[ema_shadow_name(key)]) and not torch.equal(exported[key], sd[key])
    back = load_model_from_config(cfg, path)  # use_ema: the EMA starts from the loaded (EMA) weights
    assert torch.equal(back.state_dict()[key], sd[ema_shadow_name(key)])
    with pytest.raises(ValueError, match="no EMA weights"):
        export_checkpoint(model.first_stage_model, tmp_path / "x.safetensors", ema_only=True)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_reduced_precision_exports_reload_with_their_dtype(ldm_model, tmp_path, dtype, torch_dtype):
    model, cfg = ldm_model
    for suffix in (".safetensors", ".ckpt"):
        path = export_checkpoint(model, tmp_path / f"m-{dtype}{suffix}", dtype=dtype)
        sd = load_checkpoint(path)["state_dict"]
        floats = [v for v in sd.values() if v.is_floating_point()]
        assert floats and all(v.dtype == torch_dtype for v in floats)
        key = "model.diffusion_model.out.2.weight"
        assert torch.equal(sd[key], model.state_dict()[key].to(torch_dtype))
        back = load_model_from_config(cfg, path)  # loads into the float32 model
        assert torch.allclose(back.state_dict()[key], model.state_dict()[key], rtol=1e-2, atol=1e-3)


def test_strip_training_drops_the_autoencoder_loss(tmp_path):
    cfg = load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml")
    ae = instantiate_from_config(cfg.model)
    _perturb(ae, 4)
    assert any(k.startswith("loss.discriminator.") for k in ae.state_dict())
    path = export_checkpoint(ae, tmp_path / "ae.safetensors", strip_training=True)
    sd = load_checkpoint(path)["state_dict"]
    assert not any(k.startswith("loss.") for k in sd)
    cfg.model.params.lossconfig = {"target": "torch.nn.Identity"}  # how an LDM config holds a frozen first stage
    back = load_model_from_config(cfg, path)  # strict: nothing missing, nothing unexpected
    assert torch.equal(back.state_dict()["decoder.conv_out.weight"], ae.state_dict()["decoder.conv_out.weight"])


def test_convert_script(ldm_model, tmp_path, capsys):
    import convert
    model, cfg = ldm_model
    src = export_checkpoint(model, tmp_path / "full.ckpt")
    assert convert.main(["--ckpt", str(src), "--out", str(tmp_path / "s.safetensors"), "--dtype", "fp16",
                         "--ema-only", "--strip-training"]) == 0
    sd = load_checkpoint(tmp_path / "s.safetensors")["state_dict"]
    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert convert.main(["--ckpt", str(src), "--out", str(tmp_path / "s.bin")]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert convert.main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o.ckpt")]) == 2
