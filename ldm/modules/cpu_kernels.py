"""The framework's fused CPU kernels (`csrc/`): one C++ extension, built on first use, and the ops that call it.

It holds the small-head attention kernel (`ldm.modules.small_head_attention`), a one-pass GEGLU and GroupNorm followed
by SiLU in two passes, forward and backward (float32 CPU tensors; torch's ops elsewhere and under torch.compile, which
fuses its own). Networks do not call these: `ldm.modules.kernel_backend` swaps in the modules that do when a network is
built. The extension is built with the system C++ compiler and ninja (about half a minute, logged) and cached under
TORCH_EXTENSIONS_DIR (else torch's default root), per source, flags and CPU; `python -m ldm.modules.cpu_kernels` builds
it ahead of time. Where it cannot be built, the modules use torch's ops, each kind with one warning.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / name for name in ("small_head_attention.cpp", "geglu.cpp", "group_norm_silu.cpp", "bindings.cpp")]
FUSED_ENV_VAR = "LDM_FUSED_CPU_OPS"  # "0": networks built with GEGLU and GroupNorm (+ SiLU) on torch's ops

_ext = None
_build_error: Optional[BaseException] = None
_warned_fallback: set[str] = set()  # the users that warned of a failed build


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


# A build takes about half a minute (a few on a loaded machine); torch's lock file older than this with no live owner
# is taken for the leftover of a build killed mid-way.
STALE_LOCK_SECONDS = 600
OWNER_FILE = "ldm_build_owner"  # the pid of the process building, written beside torch's lock


def build_directory(name: str) -> Path:
    """Where extension `name` is built and cached (given to torch's `load`): under TORCH_EXTENSIONS_DIR, else torch's
    default root, per Python version."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_lock(build_dir: Path) -> Optional[str]:
    """Why torch's build lock in `build_dir` is a leftover (its builder is gone), or None (no lock, a live build, or a
    torch that holds an OS-level lock). torch releases < 2.14 wait while that file exists, forever when a build
    killed mid-way left it; later ones hold an advisory lock (`cpp_extension.FileLock`) that dies with its holder."""
    from torch.utils import cpp_extension

    lock = build_dir / "lock"
    if getattr(cpp_extension, "FileLock", None) is not None or not lock.exists():
        return None
    owner = build_dir / OWNER_FILE
    try:
        pid = int(owner.read_text().strip()) if owner.exists() else None
    except (OSError, ValueError):
        pid = None
    if pid is not None and pid != os.getpid():
        return None if _pid_alive(pid) else f"the process that took it (pid {pid}) has exited"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return None  # released meanwhile
    if pid is None and age > STALE_LOCK_SECONDS:
        return f"it is {age / 60:.0f} minutes old and no builder is recorded"
    return None


def load_kernel():
    """Build (once per process, cached on disk) and return the extension; raise a RuntimeError naming the cause."""
    global _ext, _build_error
    if _ext is not None:
        return _ext
    if _build_error is not None:
        raise RuntimeError(f"the CPU kernels ({CSRC}) failed to build earlier: {_build_error}")
    from torch.utils.cpp_extension import load
    _put_ninja_on_path()
    # fast math but for the finite-math assumption: the attention kernel masks padded keys with -inf and tests row
    # maxima against it (fully masked rows), which -ffinite-math-only would let the compiler fold away
    flags = ["-O3", "-ffast-math", "-fno-finite-math-only", "-march=native", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=256")  # some CPUs' default tuning keeps GCC at 128-bit vectors
    name = f"ldm_cpu_kernels_{_cpu_tag()}"
    build_dir = build_directory(name)
    why = stale_lock(build_dir)
    if why is not None:
        _build_error = RuntimeError(f"torch's build lock {build_dir / 'lock'} is stale ({why}): a build was killed "
                                    f"mid-way. Delete that file (no build of it is running) and the kernels build "
                                    f"again")
        raise RuntimeError(str(_build_error))
    log.info("loading the CPU kernels %s (built once from %s with the system C++ compiler, about half a minute, "
             "then cached in %s)", name, CSRC, build_dir)
    owner = build_dir / OWNER_FILE
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not (build_dir / "lock").exists():  # a live builder's record stays until it is done
            owner.write_text(str(os.getpid()))
        _ext = load(name=name, sources=[str(s) for s in SOURCES], extra_include_paths=[str(CSRC)],
                    extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    except Exception as e:  # compiler missing or failing: report it, never half-load
        _build_error = e
        raise RuntimeError(f"could not build the CPU kernels from {CSRC} ({e}); they need a C++ compiler with OpenMP "
                           f"and ninja. LDM_ATTENTION_BACKEND=sdpa and {FUSED_ENV_VAR}=0 run without them.") from e
    finally:
        if owner.exists() and owner.read_text().strip() == str(os.getpid()):
            owner.unlink(missing_ok=True)
    return _ext


def kernels_built(user: str, fallback: str) -> bool:
    """Whether the extension is (or can now be) built; where it cannot, `user` warns once that it uses `fallback`."""
    if _ext is not None:
        return True
    if _build_error is not None and user in _warned_fallback:  # per op call: no exception raised and caught
        return False
    try:
        load_kernel()
    except RuntimeError as e:
        if user not in _warned_fallback:
            log.warning("%s: %s; using %s", user, e, fallback)
            _warned_fallback.add(user)
        return False
    return True


def kernel_applies(x: torch.Tensor) -> bool:
    """float32 on CPU, outside torch.compile's tracing, kernels built (a warning, once, where they cannot be)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32):
        return False
    if torch.compiler.is_compiling():  # a traced graph keeps torch's ops, which the compiler fuses itself
        return False
    return kernels_built("fused CPU ops", "torch's ops")


class _FusedGeglu(torch.autograd.Function):
    """a * GELU(g) for h = [a | g] (last dim), one pass forward and one backward; saves only h."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        ctx.save_for_backward(h)
        return load_kernel().geglu_fwd(h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        return load_kernel().geglu_bwd(grad.contiguous(), h)


def fused_geglu(h: torch.Tensor) -> Optional[torch.Tensor]:
    """GELU-gated linear unit's gating (Shazeer 2020), a * GELU(g) for h = [a | g] split in halves along the last dim
    (exact erf GELU), by the kernel; None where it does not apply (the caller runs torch's ops)."""
    if h.shape[-1] % 2 or not kernel_applies(h):
        return None
    return _FusedGeglu.apply(h)


def _channels_last(x: torch.Tensor) -> Optional[bool]:
    """How the GroupNorm kernel reads x: False contiguous, True channels-last (4-d), None neither (torch's op)."""
    if x.is_contiguous():
        return False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return True
    return None


class _FusedGroupNormSiLU(torch.autograd.Function):
    """GroupNorm(x), then SiLU when `silu`, in two passes each way; saves x and the group statistics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, silu: bool,
                channels_last: bool) -> torch.Tensor:
        y, mean, rstd = load_kernel().group_norm_silu_fwd(x, weight, bias, groups, eps, silu, channels_last)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu, ctx.channels_last = groups, silu, channels_last
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
        dx, dweight, dbias = load_kernel().group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, ctx.groups, ctx.silu,
                                                               ctx.channels_last)
        return (dx if ctx.needs_input_grad[0] else None, dweight if ctx.needs_input_grad[1] else None,
                dbias if ctx.needs_input_grad[2] else None, None, None, None, None)


def fused_group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, silu: bool) -> Optional[torch.Tensor]:
    """`norm(x)` followed by SiLU when `silu` (GroupNorm, Wu & He 2018) by the kernel, for float32 CPU tensors,
    contiguous or channels-last, with `norm`'s affine float32 weights; None where it does not apply."""
    w, b = norm.weight, norm.bias
    layout = _channels_last(x) if x.dim() >= 3 else None
    if (layout is None or w is None or b is None or w.dtype != torch.float32 or b.dtype != torch.float32
            or w.device != x.device or not kernel_applies(x)):
        return None
    return _FusedGroupNormSiLU.apply(x, w.contiguous(), b.contiguous(), norm.num_groups, norm.eps, silu, layout)


def main() -> int:
    """Build the kernels ahead of time (`python -m ldm.modules.cpu_kernels`); exit 1 when they cannot be built."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        load_kernel()
    except RuntimeError as e:
        print(f"{e}\nAttention will use scaled_dot_product_attention, GEGLU and GroupNorm torch's ops instead.")
        return 1
    print(f"CPU kernels ready (cached in {build_directory(f'ldm_cpu_kernels_{_cpu_tag()}')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
