"""The algebra training and sampling share, in one place: classifier-free guidance's combination, the eps
estimate of a denoised sample, the deterministic DDIM step, and batching two conditionings."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ldm.core.denoiser import append_dims


def cfg_combine(out_u: torch.Tensor, out_c: torch.Tensor, scale: Union[float, torch.Tensor]) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): u + s (c - u). Linear in the output, so the same for D and for
    eps / v; a per-item `scale` tensor is broadcast over the sample's dimensions."""
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        scale = append_dims(scale, out_c.dim()).to(out_c.dtype)
    return out_u + scale * (out_c - out_u)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (the eps estimate)."""
    return (x - denoised) / append_dims(sigma, x.dim())


def ddim_move(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, denoised: torch.Tensor,
              eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic DDIM step (Song et al. 2021, eq. 12, eta 0) from sigma to sigma_next in VE form, per-item levels
    or one: x0 + eps sigma_next; `eps` defaults to the one implied by x."""
    eps = to_d(x, sigma, denoised) if eps is None else eps
    return denoised + eps * (append_dims(sigma_next, x.dim()) if sigma_next.dim() > 0 else sigma_next)


def cat_conditioning(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, lists of tensors, or dicts of those."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: cat_conditioning(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return [cat_conditioning(x, y) for x, y in zip(a, b)]
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")
