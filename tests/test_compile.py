"""Opt-in torch.compile (ldm.compile): compiled and eager agree on the CPU, keys stay, settings are checked."""
from __future__ import annotations

import pytest
import torch

from _helpers import perturb, tiny_sd2
from ldm.compile import CompileSettings, is_compiled, reset
from ldm.util import ConfigError
from ldm.util import instantiate_from_config


def _perturbed_tiny_ldm():
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_sd2("v2-inference").model)
    perturb(model)
    return model, torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 16)


@pytest.mark.slow
def test_compiled_unet_agrees_with_eager_when_sampling_and_keeps_its_keys():
    """Inductor on the CPU: the UNet's no-grad output (what samplers call) equals eager's within float tolerance;
    the state-dict keys do not change (no `_orig_mod.`). About a minute on 2 cores: `make test-slow`."""
    model, x, t, context = _perturbed_tiny_ldm()
    unet = model.model.diffusion_model
    keys = list(model.state_dict())
    with torch.no_grad():
        eager = unet(x, t, context=context)
    reset()
    assert model.compile_networks(CompileSettings()) == ["model.diffusion_model"]
    assert is_compiled(unet) and not is_compiled(model.first_stage_model.decoder)
    with torch.no_grad():
        out = unet(x, t, context=context)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    assert eager.abs().mean() > 0.01  # perturbed weights: a fresh UNet's zero output would agree trivially
    reset()


@pytest.mark.slow
def test_compiled_training_step_and_decoder_agree_with_eager():
    """Inductor on the CPU, forward and backward: the UNet's loss and every gradient equal eager's; so does the
    compiled decoder's image (about three minutes on 2 cores: `make test-slow`)."""
    model, x, t, context = _perturbed_tiny_ldm()
    unet = model.model.diffusion_model
    z = torch.randn(1, 4, 8, 8)

    def training_step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet.zero_grad()
        loss = (unet(x, t, context=context) - x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in unet.parameters()]

    eager_loss, eager_grads = training_step()
    with torch.no_grad():
        eager_img = model.decode_first_stage(z)
    reset()
    model.compile_networks(CompileSettings(decoder=True))
    assert is_compiled(model.first_stage_model.decoder)
    loss, grads = training_step()
    with torch.no_grad():
        img = model.decode_first_stage(z)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(img, eager_img, rtol=1e-4, atol=1e-5)
    reset()


def test_compile_settings_from_the_config_and_their_errors():
    assert CompileSettings.parse(None) is None and CompileSettings.parse(False) is None
    assert CompileSettings.parse(True) == CompileSettings()
    assert CompileSettings.parse("max-autotune").mode == "max-autotune"
    got = CompileSettings.parse({"mode": "reduce-overhead", "decoder": True})
    assert got.decoder and got.options()["mode"] == "reduce-overhead"
    assert CompileSettings().options()["mode"] is None  # torch's own default
    with pytest.raises(ConfigError, match=r"model.params.compile: unknown key\(s\) \['modes'\]"):
        CompileSettings.parse({"modes": "default"})
    with pytest.raises(ConfigError, match="compile mode 'fast' is not one of"):
        CompileSettings.parse("fast")
    with pytest.raises(ConfigError, match="expected true/false"):
        CompileSettings.parse(3)


def test_the_config_key_compiles_when_a_trainer_sets_the_model_up_and_the_pixel_model_has_no_decoder():
    """model.params.compile reaches the UNet through Lightning's configure_model hook; asking a pixel-space model
    for its decoder names what is missing."""
    cfg = tiny_sd2("v2-inference").model
    cfg.params.compile = {"backend": "eager"}
    model = instantiate_from_config(cfg)
    assert not is_compiled(model.model.diffusion_model)
    model.configure_model()
    assert is_compiled(model.model.diffusion_model) and not is_compiled(model.first_stage_model.decoder)
    pixel = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.DDPM", "params": {
        "image_size": 8, "channels": 3, "unet_config": cfg.params.unet_config}})
    with pytest.raises(ConfigError, match="DDPM has no first_stage_model.decoder"):
        pixel.compile_networks(CompileSettings(decoder=True, backend="eager"))
    reset()
