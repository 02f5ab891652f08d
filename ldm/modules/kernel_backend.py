"""The one seam between the networks and the fused CPU kernels: modules swapped in when a network is built.

A network's forward calls its modules only. `use_cpu_kernels(network, kernels)` replaces, in place:
- a GroupNorm32 followed by a SiLU (adjacent in an nn.Sequential, or a pair a block names in `norm_silu_pairs`) by one
  `FusedGroupNormSiLU` and the SiLU by the `SiLUInNorm` placeholder; a block's lone norm (named with None) by a
  `FusedGroupNormSiLU` with silu=False;
- each GEGLU's `GeluGate` by `FusedGeluGate`;
- each CrossAttention's `Attend` by `SmallHeadAttend` with the attention backend ('auto' or 'fused_cpu').
The replacements hold the same parameter objects, so the state-dict keys and an optimizer built before stay valid, and
the swap runs both ways (`CpuKernels.off()` puts torch's modules back). Modules with hooks are left as they are. A
swapped module still runs torch's op where its kernel does not apply (not float32 on CPU, under torch.compile, or the
kernels cannot be built: one warning). UNetModel and the autoencoder's Encoder / Decoder call it at the end of their
construction with `CpuKernels.from_environment()`: LDM_ATTENTION_BACKEND and LDM_FUSED_CPU_OPS, read then.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules import small_head_attention as sha
from ldm.modules.attention import Attend, GeluGate
from ldm.modules.cpu_kernels import FUSED_ENV_VAR, fused_geglu, fused_group_norm_silu
from ldm.modules.diffusionmodules.util import GroupNorm32


@dataclass(frozen=True)
class CpuKernels:
    """Which fused CPU kernels a network runs: `attention` one of 'auto' (the small-head kernel where timed faster
    than SDPA), 'fused_cpu' (the kernel wherever it applies) or 'sdpa'; `fused_ops` GEGLU and GroupNorm (+ SiLU)."""

    attention: str = "auto"
    fused_ops: bool = True

    def __post_init__(self) -> None:
        sha.check_backend(self.attention)

    @classmethod
    def from_environment(cls) -> "CpuKernels":
        """LDM_ATTENTION_BACKEND (default 'auto') and LDM_FUSED_CPU_OPS ('0' off, '1' on, the default)."""
        attention = os.environ.get(sha.ENV_VAR, "auto")
        if attention not in sha.BACKENDS:
            raise ValueError(f"{sha.ENV_VAR}='{attention}': expected one of {sha.BACKENDS}")
        fused = os.environ.get(FUSED_ENV_VAR, "1")
        if fused not in ("0", "1"):
            raise ValueError(f"{FUSED_ENV_VAR}='{fused}': expected 0 or 1")
        return cls(attention=attention, fused_ops=fused == "1")

    @classmethod
    def off(cls) -> "CpuKernels":
        """torch's ops everywhere."""
        return cls(attention="sdpa", fused_ops=False)


class SiLUInNorm(nn.Identity):
    """Where a SiLU was: the FusedGroupNormSiLU before it computes it."""


class FusedGroupNormSiLU(GroupNorm32):
    """GroupNorm (Wu & He 2018) then SiLU when `silu`, as one fused CPU kernel where it applies; elsewhere
    GroupNorm32 and F.silu."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, silu: bool = True,
                 **factory):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **factory)
        self.silu = silu

    @classmethod
    def sharing(cls, norm: nn.GroupNorm, silu: bool) -> "FusedGroupNormSiLU":
        """One on `norm`'s parameter objects (no copy)."""
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, silu, device="meta")
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused.train(norm.training)

    def unfused(self) -> GroupNorm32:
        """The plain GroupNorm32 on this one's parameter objects."""
        norm = GroupNorm32(self.num_groups, self.num_channels, eps=self.eps, affine=self.affine, device="meta")
        norm.weight, norm.bias = self.weight, self.bias
        return norm.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fused_group_norm_silu(self, x, self.silu)
        if y is not None:
            return y
        y = super().forward(x)
        return F.silu(y) if self.silu else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, silu={self.silu}"


class FusedGeluGate(GeluGate):
    """a * GELU(g) for h = [a | g] (Shazeer 2020) by the one-pass CPU kernel where it applies, torch's ops elsewhere."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = fused_geglu(h)
        return super().forward(h) if y is None else y


class SmallHeadAttend(Attend):
    """softmax(q k^T / sqrt(d)) v by the fused small-head CPU kernel where `backend` chooses it, else SDPA."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = sha.check_backend(backend)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if sha.use_kernel(q, k, v, mask, self.backend):
            return sha.small_head_attention(q, k, v)
        return super().forward(q, k, v, mask)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _norm_pairs(owner: nn.Module) -> Iterator[tuple[str, Optional[str]]]:
    """(norm name, SiLU name or None) pairs of `owner`'s children: adjacent in a Sequential, else as declared."""
    if isinstance(owner, nn.Sequential):
        if getattr(owner, "norm_runs_alone", False):  # its forward is not run in order (ResBlock's scale-shift)
            return
        names = list(owner._modules)
        for a, b in zip(names, names[1:]):
            norm, act = owner._modules[a], owner._modules[b]
            if isinstance(norm, GroupNorm32) and (type(act) is nn.SiLU or isinstance(act, SiLUInNorm)):
                yield a, b
        return
    yield from getattr(type(owner), "norm_silu_pairs", ())


def _swap_norm(owner: nn.Module, norm_name: str, act_name: Optional[str], fused: bool) -> bool:
    norm = getattr(owner, norm_name)
    act = getattr(owner, act_name) if act_name is not None else None
    if _hooked(norm) or (act is not None and _hooked(act)):
        return False
    if fused and type(norm) is GroupNorm32 and norm.affine and (act is None or type(act) is nn.SiLU):
        setattr(owner, norm_name, FusedGroupNormSiLU.sharing(norm, silu=act is not None))
        if act is not None:
            setattr(owner, act_name, SiLUInNorm())
        return True
    if not fused and type(norm) is FusedGroupNormSiLU and (act is None) == (not norm.silu):
        setattr(owner, norm_name, norm.unfused())
        if act is not None:
            setattr(owner, act_name, nn.SiLU())
        return True
    return False


def use_cpu_kernels(network: nn.Module, kernels: Optional[CpuKernels] = None) -> dict[str, int]:
    """Put `network`'s modules on `kernels` (default: `CpuKernels.from_environment()`), in place, both ways; returns
    how many modules of each kind were swapped."""
    kernels = CpuKernels.from_environment() if kernels is None else kernels
    attend = kernels.attention != "sdpa"
    swapped = {"norm": 0, "gelu_gate": 0, "attention": 0}
    for owner in list(network.modules()):  # (subclasses of these modules are the user's own: left alone)
        for norm_name, act_name in list(_norm_pairs(owner)):
            swapped["norm"] += _swap_norm(owner, norm_name, act_name, kernels.fused_ops)
        for name, child in list(owner.named_children()):
            if _hooked(child):
                continue
            if type(child) in (GeluGate, FusedGeluGate) and (type(child) is FusedGeluGate) != kernels.fused_ops:
                setattr(owner, name, FusedGeluGate() if kernels.fused_ops else GeluGate())
                swapped["gelu_gate"] += 1
            elif type(child) in (Attend, SmallHeadAttend) and getattr(child, "backend", "sdpa") != kernels.attention:
                setattr(owner, name, SmallHeadAttend(kernels.attention) if attend else Attend())
                swapped["attention"] += 1
    return swapped


def cpu_kernels_in(network: nn.Module) -> CpuKernels:
    """Which kernels `network`'s modules run (the first attention layer's backend; any fused op counts)."""
    attention, fused = "sdpa", False
    for m in network.modules():
        if isinstance(m, SmallHeadAttend) and attention == "sdpa":
            attention = m.backend
        fused = fused or isinstance(m, (FusedGroupNormSiLU, FusedGeluGate))
    return CpuKernels(attention=attention, fused_ops=fused)
