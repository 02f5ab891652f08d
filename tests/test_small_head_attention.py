"""The fused small-head CPU attention kernel computes SDPA's function, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

import ldm.modules.small_head_attention as sha
from _helpers import needs_compiler
from ldm.modules.attention import CrossAttention
from ldm.modules.kernel_backend import CpuKernels, SmallHeadAttend, use_cpu_kernels


def on(backend: str, *modules: torch.nn.Module) -> None:
    """Put the modules' attention layers on `backend`, each with a fresh 'auto' record of timings."""
    sha._auto_choice.clear()
    for m in modules:
        use_cpu_kernels(m, CpuKernels(attention=backend))


@needs_compiler
# key counts off the vector width (padded keys), several backward key tiles, query rows left over by the row blocks
@pytest.mark.parametrize("b,h,n,m,d", [(2, 3, 50, 77, 8), (1, 2, 33, 33, 8), (1, 1, 7, 5, 8), (2, 2, 64, 64, 8),
                                       (1, 2, 37, 300, 8), (1, 1, 3, 1, 8)])
def test_kernel_matches_sdpa_forward_and_backward(b, h, n, m, d):
    torch.manual_seed(0)
    q = torch.randn(b, h, n, d, requires_grad=True)
    k = torch.randn(b, h, m, d, requires_grad=True)
    v = torch.randn(b, h, m, d, requires_grad=True)
    g = torch.randn(b, h, n, d)
    ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    out = sha.small_head_attention(q * 1, k * 1, v * 1)  # non-leaf inputs, as inside a model
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_compiler
def test_kernel_with_peaked_scores_matches_sdpa():
    """Scores spread over a hundred and more: many probabilities underflow to 0 (never NaN or subnormal garbage)."""
    torch.manual_seed(1)
    q = (torch.randn(1, 2, 40, 8) * 6).requires_grad_()
    k = (torch.randn(1, 2, 45, 8) * 6).requires_grad_()
    v = torch.randn(1, 2, 45, 8, requires_grad=True)
    g = torch.randn(1, 2, 40, 8)
    ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    out = sha.small_head_attention(q * 1, k * 1, v * 1)
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_compiler
def test_cross_attention_backend_switch():
    torch.manual_seed(0)
    attn = CrossAttention(32, context_dim=24, heads=4, dim_head=8)
    self_attn = CrossAttention(32, heads=4, dim_head=8)
    x, ctx = torch.randn(2, 40, 32), torch.randn(2, 9, 24)
    outs, grads = {}, {}
    for name in ("sdpa", "fused_cpu"):
        on(name, attn, self_attn)
        attn.zero_grad()
        y = attn(x, ctx) + self_attn(x)  # cross- and self-attention
        y.square().sum().backward()
        outs[name], grads[name] = y.detach(), attn.to_q.weight.grad.clone()
    torch.testing.assert_close(outs["fused_cpu"], outs["sdpa"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["fused_cpu"], grads["sdpa"], atol=1e-4, rtol=1e-4)


def test_kernel_applies_only_where_it_can():
    q = torch.zeros(1, 2, 4, 8)
    assert sha.applies(q, q, None)
    assert not sha.applies(q, q, torch.ones(1, 1, 1, 4, dtype=torch.bool))
    assert not sha.applies(q.double(), q.double(), None)
    assert not sha.applies(torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16), None)


def test_unknown_backend_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="LDM_ATTENTION_BACKEND"):
        CpuKernels(attention="flash9")
    with pytest.raises(ValueError, match="LDM_ATTENTION_BACKEND"):
        SmallHeadAttend("flash9")
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    monkeypatch.setenv(sha.ENV_VAR, "flash9")
    with pytest.raises(ValueError, match="LDM_ATTENTION_BACKEND='flash9'"):  # when a network is built
        UNetModel(image_size=8, in_channels=4, model_channels=16, out_channels=4, num_res_blocks=1,
                  attention_resolutions=[1], channel_mult=[1], num_head_channels=8, use_spatial_transformer=True,
                  context_dim=8, norm_groups=8)


@needs_compiler
def test_auto_times_each_shape_once_and_routes_by_the_result(monkeypatch):
    decided = []

    def faster(q, k, v, training):  # the kernel "wins" self-attention only
        decided.append((tuple(q.shape), tuple(k.shape), training))
        return q.shape[2] == k.shape[2]
    monkeypatch.setattr(sha, "_kernel_is_faster", faster)
    used = []
    real = sha._SmallHeadAttention.apply
    monkeypatch.setattr(sha._SmallHeadAttention, "apply", lambda *a: used.append(a[0].shape) or real(*a))
    attn, self_attn = CrossAttention(32, context_dim=24, heads=4, dim_head=8), CrossAttention(32, heads=4, dim_head=8)
    on("auto", attn, self_attn)
    x, ctx = torch.randn(2, 40, 32), torch.randn(2, 9, 24)
    for _ in range(2):
        (attn(x, ctx) + self_attn(x)).sum().backward()
    with torch.no_grad():
        self_attn(x)
    assert decided == [((2, 4, 40, 8), (2, 4, 9, 8), True), ((2, 4, 40, 8), (2, 4, 40, 8), True),
                       ((2, 4, 40, 8), (2, 4, 40, 8), False)]  # once per shape and mode
    assert len(used) == 3  # the self-attention each time, never the cross-attention


@needs_compiler
def test_auto_timing_leaves_the_random_stream_and_inputs_alone():
    q, k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in range(3))
    before = [t.detach().clone() for t in (q, k, v)]
    state = torch.random.get_rng_state()
    for training in (True, False):
        assert isinstance(sha._kernel_is_faster(q * 1, k * 1, v * 1, training), bool)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, (q, k, v))) and q.grad is None


def test_auto_is_the_default(monkeypatch):
    from ldm.modules.cpu_kernels import FUSED_ENV_VAR
    monkeypatch.delenv(sha.ENV_VAR, raising=False)
    monkeypatch.delenv(FUSED_ENV_VAR, raising=False)
    assert CpuKernels.from_environment() == CpuKernels(attention="auto", fused_ops=True)


@needs_compiler
def test_auto_times_inside_a_gradient_checkpointed_block():
    from ldm.modules.attention import BasicTransformerBlock
    torch.manual_seed(0)
    block = BasicTransformerBlock(32, n_heads=4, d_head=8, context_dim=24, checkpoint=True).train()
    x, ctx = torch.randn(2, 40, 32, requires_grad=True), torch.randn(2, 9, 24)
    grads = {}
    for name in ("sdpa", "auto"):  # 'auto' decides on its first call, inside the checkpointed forward
        on(name, block)
        x.grad = None
        block(x, ctx).square().sum().backward()
        grads[name] = x.grad.clone()
    torch.testing.assert_close(grads["auto"], grads["sdpa"], atol=1e-4, rtol=1e-4)


@needs_compiler
@pytest.mark.parametrize("m", [77, 16, 5])  # keys padded to the vector width, none padded, fewer than one vector
def test_kernel_with_inf_and_nan_inputs_and_fully_masked_rows_behaves_as_sdpa(m):
    """Non-finite inputs reach the kernel's row maxima and exponentials, padded keys included: a row whose every
    score is -inf (fully masked) gives 0, as SDPA, with no gradient; a row of +inf scores and a row with NaN give
    NaN, as SDPA; the finite rows are untouched."""
    torch.manual_seed(2)
    b, h, n, d = 1, 2, 6, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, d)
    k[..., 0] = -1.0 - k[..., 0].abs()  # every key's first feature negative
    q[:, :, 0] = 0.0
    q[:, :, 0, 0] = float("inf")   # row 0: every score -inf (a fully masked row)
    q[:, :, 1] = 0.0
    q[:, :, 1, 0] = -float("inf")  # row 1: every score +inf
    q[:, :, 2, 3] = float("nan")   # row 2: NaN scores
    ref = F.scaled_dot_product_attention(q, k, v)
    out = sha.small_head_attention(q, k, v)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0])) and torch.equal(ref[:, :, 0], out[:, :, 0])
    assert torch.isnan(out[:, :, 1]).all() and torch.isnan(ref[:, :, 1]).all()
    assert torch.isnan(out[:, :, 2]).all()
    if m >= 16:  # (SDPA's CPU kernel returns 0 for this NaN row below 16 keys, NaN from there on)
        assert torch.isnan(ref[:, :, 2]).all()
    torch.testing.assert_close(out[:, :, 3:], ref[:, :, 3:], atol=1e-5, rtol=1e-4)

    # forward and backward with the fully masked row among finite ones: SDPA's values and gradients
    qm = torch.cat([q[:, :, :1], q[:, :, 3:]], 2).requires_grad_()
    km, vm = k.clone().requires_grad_(), v.clone().requires_grad_()
    g = torch.randn(b, h, qm.shape[2], d)
    ref = F.scaled_dot_product_attention(qm, km, vm)
    ref_grads = torch.autograd.grad(ref, (qm, km, vm), g)
    out = sha.small_head_attention(qm * 1, km * 1, vm * 1)
    grads = torch.autograd.grad(out, (qm, km, vm), g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):  # NaN where SDPA's is (0 * inf in the products with that q row)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert torch.isfinite(grads[2]).all() and torch.isfinite(grads[0][:, :, 1:]).all()  # dV, the finite rows' dQ
