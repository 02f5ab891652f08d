"""UNet: SD v1/v2 state-dict layout key for key, and the same function as diffusers' UNet2DConditionModel."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.convert.diffusers_unet import compvis_to_diffusers_unet
from ldm.modules.attention import CrossAttention, GEGLU
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding

LAYOUTS = Path(__file__).resolve().parent / "data" / "sd_state_dict_layouts.json"
SD_COMMON = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, transformer_depth=1,
                 use_checkpoint=True, legacy=False)
SD_V1 = dict(SD_COMMON, num_heads=8, context_dim=768)
SD_V2 = dict(SD_COMMON, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)


def _ref(name):
    """{key: shape} of a published SD section (tests/data)."""
    return json.loads(LAYOUTS.read_text())[name]["shapes"]


@pytest.mark.parametrize("name,cfg,params", [("sd_v1_unet", SD_V1, 859_520_964), ("sd_v2_unet", SD_V2, 865_910_724)])
def test_sd_layout_key_for_key(name, cfg, params):
    ref = _ref(name)
    with torch.device("meta"):
        model = UNetModel(**cfg)
    sd = model.state_dict()
    assert set(sd) == set(ref), sorted(set(sd) ^ set(ref))[:10]
    assert all(list(sd[k].shape) == s for k, s in ref.items())
    assert sum(p.numel() for p in model.parameters()) == params


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 5, 999])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(emb[:, :4], torch.cos(t[:, None] * freqs)) and torch.allclose(emb[:, 4:], torch.sin(t[:, None] * freqs))


def test_geglu_value_times_gelu_gate():
    g = GEGLU(3, 2)
    x = torch.randn(5, 3)
    h = g.proj(x)
    assert torch.allclose(g(x), h[:, :2] * torch.nn.functional.gelu(h[:, 2:]))


def test_cross_attention_matches_explicit_softmax():
    a = CrossAttention(16, context_dim=8, heads=2, dim_head=4)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    q = a.to_q(x).view(2, 5, 2, 4).transpose(1, 2)
    k = a.to_k(c).view(2, 7, 2, 4).transpose(1, 2)
    v = a.to_v(c).view(2, 7, 2, 4).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    ref = a.to_out((w @ v).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(a(x, c), ref, atol=1e-6)


def _tiny(v2: bool):
    cfg = dict(SD_V2 if v2 else SD_V1, model_channels=32, channel_mult=[1, 2, 2, 2], use_checkpoint=False)
    cfg["context_dim"] = 24
    if v2:
        cfg["num_head_channels"] = 16
    return cfg


def _diffusers_twin(cfg, v2: bool):
    from diffusers import UNet2DConditionModel
    mc = cfg["model_channels"]
    chans = tuple(mc * m for m in cfg["channel_mult"])
    heads = [c // cfg["num_head_channels"] for c in chans] if v2 else cfg["num_heads"]
    return UNet2DConditionModel(
        sample_size=cfg["image_size"], in_channels=4, out_channels=4, block_out_channels=chans, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=cfg["context_dim"],
        attention_head_dim=heads, use_linear_projection=v2, norm_num_groups=32)


@pytest.mark.parametrize("v2,size", [(False, (32, 32)), (True, (32, 32)), (False, (24, 36)), (True, (27, 33))],
                         ids=["v1", "v2", "v1-24x36", "v2-odd-27x33"])
def test_same_function_as_diffusers(v2, size):
    """Also at latent sides that are not multiples of the UNet's factor 8 (upsampling to the skip's size)."""
    pytest.importorskip("diffusers")
    cfg = _tiny(v2)
    ours = UNetModel(**cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():  # non-zero everywhere, incl. the zero-initialised output layers
            p.add_(torch.randn_like(p) * 0.02)
    twin = _diffusers_twin(cfg, v2).eval()
    converted = compvis_to_diffusers_unet(ours.state_dict(), 2, 4, attention_levels=[0, 1, 2])
    twin.load_state_dict(converted, strict=True)
    x, t, c = torch.randn(2, 4, *size), torch.tensor([10, 900]), torch.randn(2, 7, 24)
    with torch.no_grad():
        a = ours(x, t, context=c)
        b = twin(x, t, encoder_hidden_states=c).sample
    assert a.shape == x.shape
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_channels_last_by_default_same_function_and_gradients(v2):
    """Conv weights are stored channels-last (faster oneDNN / cuDNN convolutions); the state dict, the output (in the
    usual layout) and the gradients are those of the contiguous-layout UNet."""
    cfg = _tiny(v2)
    torch.manual_seed(0)
    fast = UNetModel(**cfg)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    plain = UNetModel(**cfg, channels_last=False)
    plain.load_state_dict(fast.state_dict())
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
                         if w.shape[-1] > 1)
    assert all(p.is_contiguous() for p in plain.parameters())
    assert list(fast.state_dict()) == list(plain.state_dict())
    x, t, c = torch.randn(2, 4, 27, 33), torch.tensor([10, 900]), torch.randn(2, 7, 24)
    outs = []
    for model in (fast, plain):
        y = model(x, t, context=c)
        assert y.is_contiguous()
        y.square().mean().backward()
        outs.append((y.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], atol=1e-5, rtol=1e-4, msg=name)
    for name, p in fast.named_parameters():  # the layout contract the fused optimizer relies on (below)
        assert p.grad.stride() == p.stride(), name


def test_fused_adamw_steps_the_channels_last_unet_as_the_plain_loop_does():
    """torch's fused CPU AdamW updates a channels-last parameter wrongly when its gradient is laid out otherwise
    (elements paired out of order: 0.58 off after 3 steps at lr 0.1, on torch 2.14): the framework's default optimizer
    is fused, so the UNet's gradients must keep their parameters' layout, as autograd's accumulation gives them."""
    cfg = _tiny(False)
    torch.manual_seed(0)
    models = [UNetModel(**cfg) for _ in range(2)]
    with torch.no_grad():  # away from initialisation: a fresh UNet's zero output layer gives zero gradients upstream
        for p in models[0].parameters():
            p.add_(torch.randn_like(p) * 0.02)
    models[1].load_state_dict(models[0].state_dict())
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 7, 24)
    opts = [torch.optim.AdamW(models[0].parameters(), lr=1e-2, fused=True),
            torch.optim.AdamW(models[1].parameters(), lr=1e-2, foreach=False)]
    for model, opt in zip(models, opts):  # one step: Adam's later steps amplify rounding where gradients are ~0
        model(x, t, context=c).square().mean().backward()
        opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_framework_fused_adamw_puts_gradients_in_their_parameters_layout():
    """A channels-last weight given a contiguous gradient: torch's fused CPU AdamW alone updates it with the wrong
    elements (up to 0.58 off at lr 0.1 on torch 2.14); with the framework's step pre-hook
    (`gradients_in_parameter_layout`) it matches the plain loop."""
    from ldm.models.diffusion.diffusion_module import gradients_in_parameter_layout
    torch.manual_seed(0)
    w, g = torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last), torch.randn(8, 6, 3, 3)
    results = {}
    for name, kw, hook in (("loop", {"foreach": False}, False), ("fused+hook", {"fused": True}, True)):
        p = torch.nn.Parameter(w.clone(memory_format=torch.preserve_format))
        opt = torch.optim.AdamW([p], lr=0.1, **kw)
        if hook:
            opt.register_step_pre_hook(gradients_in_parameter_layout)
        p.grad = g.clone()  # contiguous, unlike its parameter
        opt.step()
        results[name] = p.detach()
    torch.testing.assert_close(results["fused+hook"], results["loop"], atol=1e-6, rtol=1e-5)
