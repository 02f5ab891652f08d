"""The CPU kernels behind one seam: chosen when a network is built (modules swapped in), per network, both ways."""
import copy
import sys
from pathlib import Path

import torch

KERNEL_FILES = {"cpu_kernels.py", "small_head_attention.py", "kernel_backend.py"}


def _unet():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(0)
    return UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     attention_resolutions=[1, 2], channel_mult=[1, 2], num_head_channels=8,
                     use_spatial_transformer=True, context_dim=16, norm_groups=8, resblock_updown=True)


def _autoencoder():
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    dd = dict(ch=16, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], in_channels=3, resolution=16,
              z_channels=4, double_z=False, norm_groups=8)
    torch.manual_seed(0)
    return Encoder(**dd), Decoder(**dd)


def _perturb(*nets: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 500]), torch.randn(2, 5, 16, generator=g),
            torch.randn(2, 3, 16, 16, generator=g))


def _kernel_calls(run) -> list[str]:
    """The functions of the kernels' modules that `run()` calls (forward and backward)."""
    seen: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and Path(frame.f_code.co_filename).name in KERNEL_FILES:
            seen.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return seen


def _train_step(unet, enc, dec):
    x, t, ctx, img = _inputs()
    return lambda: (unet(x, t, context=ctx).square().mean() + dec(enc(img)).square().mean()).backward()


def test_networks_built_with_the_kernels_off_run_no_kernel_code(monkeypatch):
    monkeypatch.setenv("LDM_ATTENTION_BACKEND", "sdpa")
    monkeypatch.setenv("LDM_FUSED_CPU_OPS", "0")
    unet, (enc, dec) = _unet(), _autoencoder()
    assert _kernel_calls(_train_step(unet, enc, dec)) == []


def test_two_networks_in_one_process_run_their_own_kernels(monkeypatch):
    """No process-wide switch: the environment is read when each network is built, and each keeps its choice."""
    monkeypatch.delenv("LDM_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("LDM_FUSED_CPU_OPS", raising=False)
    fused = (_unet(), *_autoencoder())
    monkeypatch.setenv("LDM_ATTENTION_BACKEND", "sdpa")
    monkeypatch.setenv("LDM_FUSED_CPU_OPS", "0")
    plain = (_unet(), *_autoencoder())
    _perturb(*fused)
    for a, b in zip(fused, plain):
        assert list(a.state_dict()) == list(b.state_dict())
        b.load_state_dict(a.state_dict())
    monkeypatch.delenv("LDM_ATTENTION_BACKEND")  # a built network ignores later changes
    monkeypatch.delenv("LDM_FUSED_CPU_OPS")
    calls = _kernel_calls(_train_step(*fused))
    assert any(c.endswith(":forward") for c in calls), calls  # the swapped modules' forwards, built or not
    assert _kernel_calls(_train_step(*plain)) == []
    for a, b in zip(fused, plain):
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_the_swap_keeps_parameters_and_keys_and_runs_both_ways(monkeypatch):
    from ldm.modules.kernel_backend import CpuKernels, FusedGroupNormSiLU, cpu_kernels_in, use_cpu_kernels

    monkeypatch.setenv("LDM_ATTENTION_BACKEND", "sdpa")
    monkeypatch.setenv("LDM_FUSED_CPU_OPS", "0")
    unet = _unet()
    _perturb(unet)
    never = copy.deepcopy(unet)
    assert cpu_kernels_in(unet) == CpuKernels.off()
    params, keys = [id(p) for p in unet.parameters()], list(unet.state_dict())
    types = [type(m) for m in unet.modules()]
    opt = torch.optim.SGD(unet.parameters(), lr=0.0)  # built before the swap
    swapped = use_cpu_kernels(unet, CpuKernels(attention="fused_cpu"))
    # 10 ResBlocks (2 in, 1 down, 2 middle, 4 out, 1 up) with two norms each, the out norm and 7 transformers' norms;
    # two attentions and a GEGLU per transformer
    assert swapped == {"norm": 2 * 10 + 1 + 7, "gelu_gate": 7, "attention": 14}, swapped
    assert any(isinstance(m, FusedGroupNormSiLU) for m in unet.modules())
    assert cpu_kernels_in(unet) == CpuKernels(attention="fused_cpu")
    assert [id(p) for p in unet.parameters()] == params and list(unet.state_dict()) == keys
    assert {id(p) for g in opt.param_groups for p in g["params"]} == set(params)
    assert use_cpu_kernels(unet, CpuKernels(attention="fused_cpu")) == {"norm": 0, "gelu_gate": 0, "attention": 0}
    copied = copy.deepcopy(unet)  # EMA and frozen copies keep the choice
    assert cpu_kernels_in(copied) == CpuKernels(attention="fused_cpu")

    use_cpu_kernels(unet, CpuKernels.off())
    assert [type(m) for m in unet.modules()] == types and [id(p) for p in unet.parameters()] == params
    x, t, ctx, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(unet(x, t, context=ctx), never(x, t, context=ctx))
        torch.testing.assert_close(copied(x, t, context=ctx), never(x, t, context=ctx), atol=1e-4, rtol=1e-3)


def test_a_bad_environment_value_is_refused_when_the_network_is_built(monkeypatch):
    import pytest
    monkeypatch.setenv("LDM_FUSED_CPU_OPS", "yes")
    with pytest.raises(ValueError, match="LDM_FUSED_CPU_OPS='yes'"):
        _autoencoder()


def test_a_scale_shift_resblock_keeps_its_out_norm_apart_from_the_silu():
    """With use_scale_shift_norm the out norm's output is scaled and shifted before the SiLU: not fused."""
    from ldm.modules.diffusionmodules.openaimodel import ResBlock
    from ldm.modules.kernel_backend import CpuKernels, use_cpu_kernels

    torch.manual_seed(0)
    block = ResBlock(16, 8, 0.0, out_channels=16, use_scale_shift_norm=True, norm_groups=4)
    _perturb(block)
    plain = copy.deepcopy(block)
    use_cpu_kernels(plain, CpuKernels.off())
    assert use_cpu_kernels(block, CpuKernels())["norm"] == 1  # in_layers only
    x, emb = torch.randn(2, 16, 6, 6), torch.randn(2, 8)
    torch.testing.assert_close(block(x, emb), plain(x, emb), atol=1e-5, rtol=1e-4)
