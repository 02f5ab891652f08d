"""Denoiser wrappers: classifier-free guidance (batched), guidance rescale, thresholding, inpainting masks, img2img."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn


def _cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, lists of tensors, or dicts of those."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return [_cat_cond(x, y) for x, y in zip(a, b)]
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): u + scale * (c - u), both in one batched forward.

    `cond` and `uncond` are dicts of the inner denoiser's keyword arguments (e.g. {"context": emb} or
    {"y": labels}). `rescale` > 0 applies guidance rescale (Lin et al. 2023, eq. 15-16) to the guided
    x0 estimate: its per-sample std is matched to the conditional estimate's, mixed with weight `rescale`.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], scale: float = 1.0, rescale: float = 0.0):
        super().__init__()
        self.inner, self.scale, self.rescale = denoiser, scale, rescale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[dict] = None,
                uncond: Optional[dict] = None, **kwargs) -> torch.Tensor:
        cond = cond or {}
        if uncond is None or self.scale == 1.0:
            return self.inner(x, sigma, **cond, **kwargs)
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        out_u, out_c = self.inner(x_in, sigma_in, **_cat_cond(uncond, cond), **kwargs).chunk(2)
        guided = out_u + self.scale * (out_c - out_u)
        if self.rescale > 0:
            dims = list(range(1, x.dim()))
            factor = out_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
            guided = self.rescale * (guided * factor) + (1 - self.rescale) * guided
        return guided


class ThresholdedDenoiser(nn.Module):
    """Static clipping of x0 to [-max_value, max_value], or dynamic thresholding (Saharia et al. 2022, Imagen)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], percentile: Optional[float] = 0.995,
                 max_value: float = 1.0):
        super().__init__()
        self.inner, self.percentile, self.max_value = denoiser, percentile, max_value

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        x0 = self.inner(x, sigma, **kwargs)
        if self.percentile is None:
            return x0.clamp(-self.max_value, self.max_value)
        s = torch.quantile(x0.abs().reshape(x0.shape[0], -1).float(), self.percentile, dim=1)
        s = s.clamp_min(self.max_value).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return x0.clamp(-s, s) / s * self.max_value


class MaskedDenoiser(nn.Module):
    """Inpainting: where `mask` is 1 the x0 estimate is the known `x0_known` (kept), elsewhere the model's."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], mask: torch.Tensor, x0_known: torch.Tensor):
        super().__init__()
        self.inner, self.mask, self.x0_known = denoiser, mask, x0_known

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        x0 = self.inner(x, sigma, **kwargs)
        return self.mask * self.x0_known + (1 - self.mask) * x0


def img2img_start(x0: torch.Tensor, sigmas: torch.Tensor, strength: float, noise: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDEdit (Meng et al. 2022): noise x0 to the level `strength` of the way up, return (x, remaining sigmas)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    steps = len(sigmas) - 1
    start = min(steps - 1, max(0, steps - int(round(strength * steps))))
    sig = sigmas[start:]
    return x0 + noise * sig[0], sig
