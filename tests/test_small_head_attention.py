"""The fused small-head CPU attention kernel computes SDPA's function, forward and backward."""
import shutil

import pytest
import torch
import torch.nn.functional as F

import ldm.modules.small_head_attention as sha
from ldm.modules.attention import CrossAttention

def _has_ninja() -> bool:
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return shutil.which("ninja") is not None


needs_compiler = pytest.mark.skipif((shutil.which("c++") is None and shutil.which("g++") is None) or not _has_ninja(),
                                    reason="no C++ compiler or ninja to build the kernel")


@pytest.fixture
def backend():
    before = sha.get_attention_backend()
    yield sha.set_attention_backend
    sha.set_attention_backend(before)


@needs_compiler
@pytest.mark.parametrize("b,h,n,m,d", [(2, 3, 50, 77, 8), (1, 2, 33, 33, 8), (1, 1, 7, 5, 8), (2, 2, 64, 64, 8)])
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
def test_cross_attention_backend_switch(backend):
    torch.manual_seed(0)
    attn = CrossAttention(32, context_dim=24, heads=4, dim_head=8)
    self_attn = CrossAttention(32, heads=4, dim_head=8)
    x, ctx = torch.randn(2, 40, 32), torch.randn(2, 9, 24)
    outs, grads = {}, {}
    for name in ("sdpa", "fused_cpu"):
        backend(name)
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


def test_unknown_backend_is_refused(backend):
    with pytest.raises(ValueError, match="LDM_ATTENTION_BACKEND"):
        backend("flash9")
