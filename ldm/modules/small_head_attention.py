"""Fused CPU attention for small head dims: a C++ kernel (`csrc/small_head_attention.cpp`) built on first use.

PyTorch's CPU `scaled_dot_product_attention` runs at a fraction of the machine's speed when heads are
8 wide (its GEMMs have the head dim as inner size), which is where small research UNets spend
most of a training step. This kernel computes the same function, softmax(q k^T / sqrt(d)) v, forward
and backward, row by row without the score matrix. It is opt-in (`set_attention_backend`) because the
first use compiles it with the system C++ compiler (about a minute; cached by torch under
TORCH_EXTENSIONS_DIR, per source, flags and CPU).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "small_head_attention.cpp"
SUPPORTED_HEAD_DIMS = (8,)  # at 16 SDPA was faster (benchmarks/attention_small_heads.py)
BACKENDS = ("sdpa", "fused_cpu", "auto")
ENV_VAR = "LDM_ATTENTION_BACKEND"

_backend = os.environ.get(ENV_VAR, "sdpa")
_ext = None
_build_error: Optional[BaseException] = None
_warned_fallback = False


def set_attention_backend(name: str) -> None:
    """Choose how CrossAttention computes attention: 'sdpa' (default), 'fused_cpu' (this kernel where it
    applies, an error if it cannot be built) or 'auto' (this kernel where it applies and builds, else SDPA)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend '{name}': expected one of {BACKENDS} (also settable as {ENV_VAR})")
    _backend = name


def get_attention_backend() -> str:
    """The backend chosen by set_attention_backend or the LDM_ATTENTION_BACKEND environment variable."""
    if _backend not in BACKENDS:
        raise ValueError(f"{ENV_VAR}='{_backend}': expected one of {BACKENDS}")
    return _backend


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags, so a kernel built with -march=native is not reused elsewhere."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else platform.processor()
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), text)
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch builds extensions with `ninja` from PATH; the pip `ninja` package lives in the environment's bin."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return  # the build then fails and load_kernel reports it
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load_kernel():
    """Build (once per process, cached on disk) and return the extension; raise a RuntimeError naming the cause."""
    global _ext, _build_error
    if _ext is not None:
        return _ext
    if _build_error is not None:
        raise RuntimeError(f"small-head attention kernel ({SOURCE}) failed to build earlier: {_build_error}")
    from torch.utils.cpp_extension import load
    _put_ninja_on_path()
    flags = ["-O3", "-ffast-math", "-march=native", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=256")  # some CPUs' default tuning keeps GCC at 128-bit vectors
    try:
        _ext = load(name=f"ldm_small_head_attention_{_cpu_tag()}", sources=[str(SOURCE)], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # compiler missing or failing: report it, never half-load
        _build_error = e
        raise RuntimeError(f"could not build the small-head attention kernel from {SOURCE} ({e}); it needs a C++ "
                           f"compiler with OpenMP. Use {ENV_VAR}=sdpa (the default) to run without it.") from e
    return _ext


def applies(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Whether the kernel handles this call: float32 on CPU, no mask, 8-wide heads."""
    return (mask is None and q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == torch.float32
            and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dim() == 4)


def use_kernel(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Apply the chosen backend to this call (building the kernel on first use)."""
    backend = get_attention_backend()
    if backend == "sdpa" or not applies(q, k, mask):
        return False
    if backend == "fused_cpu":
        load_kernel()
        return True
    global _warned_fallback
    try:
        load_kernel()
        return True
    except RuntimeError as e:
        if not _warned_fallback:
            log.warning("attention backend 'auto': %s; using scaled_dot_product_attention", e)
            _warned_fallback = True
        return False


class _SmallHeadAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v with the fused kernel, forward and backward; q rows in (B, N, H, D) memory."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        m = k.shape[2]
        scale = d ** -0.5
        q_rows = q.transpose(1, 2).contiguous()  # no copy when q is a head split of a (B, N, H*D) projection
        kt = k.reshape(b * h, m, d).transpose(1, 2).contiguous()
        vt = v.reshape(b * h, m, d).transpose(1, 2).contiguous()
        out, lse = load_kernel().fwd(q_rows, kt, vt, scale)
        ctx.save_for_backward(q_rows, kt, vt, out, lse)
        ctx.scale = scale
        return out.transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D) memory

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q_rows, kt, vt, out, lse = ctx.saved_tensors
        b, n, h, d = q_rows.shape
        m = kt.shape[2]
        dq, dkt, dvt = load_kernel().bwd(grad_out.transpose(1, 2).contiguous(), q_rows, kt, vt, out, lse, ctx.scale)
        return dq.transpose(1, 2), dkt.transpose(1, 2).reshape(b, h, m, d), dvt.transpose(1, 2).reshape(b, h, m, d)


def small_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, H, N, D) float32 CPU tensors, D in SUPPORTED_HEAD_DIMS (fused kernel)."""
    if not applies(q, k, None) or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"small_head_attention: needs float32 CPU (B, H, N, D) tensors with D in {SUPPORTED_HEAD_DIMS}; "
                         f"got q {tuple(q.shape)} {q.dtype} on {q.device}, v {tuple(v.shape)}")
    return _SmallHeadAttention.apply(q, k, v)
