"""Fused CPU attention for small head dims: a C++ kernel (`csrc/small_head_attention.cpp`) built on first use.

PyTorch's CPU `scaled_dot_product_attention` runs at a fraction of the machine's speed when heads are
8 wide (its GEMMs have the head dim as inner size), which is where small research UNets spend
most of a training step. This kernel computes the same function, softmax(q k^T / sqrt(d)) v, forward
and backward, in blocks of query rows without the score matrix (keys padded to the vector width). It ran
at 1.4-1.7x SDPA's speed, forward and backward, on an AVX-512 CPU (an earlier version: 1.8x on an AVX2 one;
benchmarks/RESULTS.md), but that depends on the CPU, so the default backend, 'auto', times both once per
attention shape, forward and backward, and keeps the faster (as cuDNN's benchmark mode does). It builds the
kernel on first use, with the framework's other CPU kernels (`ldm.modules.cpu_kernels`), and uses SDPA, with a
warning, when it cannot be built. A network's attention layers get the backend when it is built
(`ldm.modules.kernel_backend`).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from ldm.modules.cpu_kernels import kernels_built, load_kernel

log = logging.getLogger(__name__)

SUPPORTED_HEAD_DIMS = (8,)  # at 16 SDPA was faster (benchmarks/attention_small_heads.py)
BACKENDS = ("sdpa", "fused_cpu", "auto")
ENV_VAR = "LDM_ATTENTION_BACKEND"

# 'auto': timed runs per backend and shape (the best of them counts), and the choice made per shape, shared by the
# attention layers of every network in the process (a cache of measurements, not a setting)
AUTO_REPEATS = 3
_auto_choice: dict[tuple, bool] = {}


def check_backend(name: str) -> str:
    """`name` if it is one of BACKENDS, else a ValueError naming the choices."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend '{name}': expected one of {BACKENDS} (also settable as {ENV_VAR})")
    return name


def applies(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Whether the kernel handles this call: float32 on CPU, no mask, 8-wide heads."""
    return (mask is None and q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == torch.float32
            and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dim() == 4)


def use_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], backend: str) -> bool:
    """Whether `backend` runs this call on the kernel (building it on first use; under 'auto', timing both backends on
    the first call of each shape)."""
    if backend == "sdpa" or not applies(q, k, mask):
        return False
    if backend == "fused_cpu":
        load_kernel()
        return True
    if torch.compiler.is_compiling():  # a traced graph keeps SDPA, which the compiler knows
        return False
    if not kernels_built("attention backend 'auto'", "scaled_dot_product_attention"):
        return False
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = (tuple(q.shape), tuple(q.stride()), tuple(k.shape), tuple(k.stride()), backward, torch.get_num_threads())
    if key not in _auto_choice:
        _auto_choice[key] = _kernel_is_faster(q, k, v, backward)
    return _auto_choice[key]


def _best_time(run: Callable[[], None]) -> float:
    """Best wall time of AUTO_REPEATS runs after one warm-up."""
    run()
    best = float("inf")
    for _ in range(AUTO_REPEATS):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def _kernel_is_faster(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool) -> bool:
    """Time this kernel and SDPA, forward (and backward when training), on copies of this call's tensors (same
    layout; the incoming gradient is q itself, so no random numbers are drawn) and say whether the kernel won."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t.detach()).requires_grad_(backward)

    # identity hooks: inside a gradient-checkpointed block the timing's own saved tensors stay out of the checkpoint's
    # record, which the recomputation (with the choice made) must match
    with torch.set_grad_enabled(backward), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        qc, kc, vc = copy(q), copy(k), copy(v)
        grad = q.detach()

        def timed(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
            if not backward:
                return lambda: fn(qc, kc, vc)
            return lambda: torch.autograd.grad(fn(qc, kc, vc), (qc, kc, vc), grad)

        kernel = _best_time(timed(_SmallHeadAttention.apply))
        sdpa = _best_time(timed(torch.nn.functional.scaled_dot_product_attention))
    log.debug("attention 'auto' for q %s, k %s (%s): kernel %.2f ms, SDPA %.2f ms", tuple(q.shape), tuple(k.shape),
              "forward and backward" if backward else "forward", 1e3 * kernel, 1e3 * sdpa)
    return kernel < sdpa


def _keys_transposed(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, M, D) keys or values as the kernel reads them: (B*H, D, Mp), M padded with zeros to a multiple of
    the kernel's vector width (one copy)."""
    b, h, m, d = x.shape
    mp = -(-m // width) * width
    out = x.new_empty(b * h, d, mp)
    if mp > m:
        out[:, :, m:] = 0
    out[:, :, :m].view(b, h, d, m).copy_(x.transpose(2, 3))
    return out


class _SmallHeadAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v with the fused kernel, forward and backward; q rows in (B, N, H, D) memory."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ext = load_kernel()
        m, d = k.shape[2], q.shape[3]
        scale = d ** -0.5
        q_rows = q.transpose(1, 2).contiguous()  # no copy when q is a head split of a (B, N, H*D) projection
        kt, vt = _keys_transposed(k, ext.width()), _keys_transposed(v, ext.width())
        out, lse = ext.fwd(q_rows, kt, vt, scale, m)
        ctx.save_for_backward(q_rows, kt, vt, out, lse)
        ctx.scale, ctx.keys = scale, m
        return out.transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D) memory

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q_rows, kt, vt, out, lse = ctx.saved_tensors
        b, _, h, d = q_rows.shape
        m = ctx.keys
        dq, dkt, dvt = load_kernel().bwd(grad_out.transpose(1, 2).contiguous(), q_rows, kt, vt, out, lse, ctx.scale, m)

        def unpad(t: torch.Tensor) -> torch.Tensor:  # (B*H, D, Mp) -> (B, H, M, D) view
            return t[:, :, :m].view(b, h, d, m).transpose(2, 3)
        return dq.transpose(1, 2), unpad(dkt), unpad(dvt)


def small_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, H, N, D) float32 CPU tensors, D in SUPPORTED_HEAD_DIMS (fused kernel)."""
    if not applies(q, k, None) or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"small_head_attention: needs float32 CPU (B, H, N, D) tensors with D in {SUPPORTED_HEAD_DIMS}; "
                         f"got q {tuple(q.shape)} {q.dtype} on {q.device}, v {tuple(v.shape)}")
    return _SmallHeadAttention.apply(q, k, v)
