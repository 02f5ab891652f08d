"""Denoiser wrappers: classifier-free guidance (batched), guidance rescale, thresholding, inpainting masks, img2img."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ldm.errors import InputError
from ldm.core.algebra import cat_conditioning, cfg_combine
from ldm.core.denoiser import append_dims


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match the guided output's per-sample std to the conditional one's,
    then mix with weight phi."""
    dims = list(range(1, guided.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


@dataclass
class Conditioning:
    """A model's conditioning for one batch: `cond`, and `uncond` for classifier-free guidance (None: unguided).

    Model kinds build it (`conditioning()`); for a dict conditioning the unconditional branch is `cond` with
    only the model's guided keys replaced by their null form (sgm's `Guider.prepare_inputs`: which keys
    guidance nulls is data of the model kind), the rest shared.
    """
    cond: Any = None
    uncond: Any = None

    @classmethod
    def guided(cls, cond: Any, null: Optional[dict] = None) -> "Conditioning":
        """`cond` with its unconditional twin: `null`'s keys replaced (None or {}: no guidance possible)."""
        if not null:
            return cls(cond, None)
        return cls(cond, {**cond, **null})

    def extra_args(self, scale: float) -> dict:
        """The `extra_args` of a sampler run on a CFGDenoiser: the unconditional branch only when guiding."""
        extra: dict = {"cond": {"c": self.cond}}
        if self.uncond is not None and scale != 1.0:
            extra["uncond"] = {"c": self.uncond}
        return extra

    @property
    def latent_size(self) -> Optional[tuple[int, ...]]:
        """The size the concatenated inputs fix for the sample: (h, w), or (t, h, w) for clips (None when nothing
        is concatenated)."""
        concat = self.cond.get("c_concat") if isinstance(self.cond, dict) else None
        return tuple(concat[0].shape[2:]) if concat else None

    @property
    def batch_size(self) -> Optional[int]:
        """The batch size of the conditioning's tensors (None for an unconditional model)."""
        first = next(iter(self.cond.values())) if isinstance(self.cond, dict) and self.cond else self.cond
        first = first[0] if isinstance(first, (list, tuple)) else first
        return int(first.shape[0]) if isinstance(first, torch.Tensor) else None


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): u + scale * (c - u), both in one batched forward.

    `cond` and `uncond` are dicts of the inner denoiser's keyword arguments (e.g. {"c": emb} or
    {"y": labels}). `rescale` > 0 applies guidance rescale to the network's output (eps or v, as
    diffusers' `guidance_rescale`), which needs an inner `ldm.sampling.Denoiser` to convert between
    its output and the x0 estimate.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], scale: float = 1.0, rescale: float = 0.0):
        super().__init__()
        self.inner, self.scale, self.rescale = denoiser, scale, rescale
        if rescale > 0 and not hasattr(denoiser, "model_output"):
            raise TypeError(f"guidance rescale acts on the network output (eps or v): wrap an ldm.sampling.Denoiser "
                            f"(it converts D(x, sigma) to that output), not a {type(denoiser).__name__}")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[dict] = None,
                uncond: Optional[dict] = None, **kwargs) -> torch.Tensor:
        cond = cond or {}
        if uncond is None or self.scale == 1.0:
            return self.inner(x, sigma, **cond, **kwargs)
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        out_u, out_c = self.inner(x_in, sigma_in, **cat_conditioning(uncond, cond), **kwargs).chunk(2)
        guided = cfg_combine(out_u, out_c, self.scale)
        if self.rescale > 0:
            f = rescale_guidance(self.inner.model_output(x, sigma, guided), self.inner.model_output(x, sigma, out_c),
                                 self.rescale)
            guided = self.inner.from_model_output(x, sigma, f)
        return guided


class ThresholdMode(str, Enum):
    """How an x0 estimate is bounded."""
    STATIC = "static"    # clamp to [-max_value, max_value]
    DYNAMIC = "dynamic"  # Imagen (Saharia et al. 2022): s = max(percentile of |x0|, max_value); clamp to +-s, divide by s
    NORM = "norm"        # Stable Diffusion 2 `norm_thresholding`: scale x0 down to an RMS of at most max_value


def threshold_x0(x0: torch.Tensor, mode: Union[ThresholdMode, str], max_value: float = 1.0,
                 percentile: float = 0.995) -> torch.Tensor:
    """Bound an x0 estimate per sample (see ThresholdMode)."""
    mode = ThresholdMode(mode)
    if mode is ThresholdMode.STATIC:
        return x0.clamp(-max_value, max_value)
    flat = x0.reshape(x0.shape[0], -1).float()
    if mode is ThresholdMode.NORM:
        s = flat.pow(2).mean(dim=1).sqrt().clamp_min(max_value)
        return x0 * append_dims(max_value / s, x0.dim()).to(x0.dtype)
    s = torch.quantile(flat.abs(), percentile, dim=1).clamp_min(max_value)
    s = append_dims(s, x0.dim()).to(x0.dtype)
    return x0.clamp(-s, s) / s * max_value


class ThresholdedDenoiser(nn.Module):
    """An x0 estimate bounded by `threshold_x0`: static clipping (pixels), Imagen's dynamic or SD2's norm thresholding."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], mode: Union[ThresholdMode, str] = ThresholdMode.DYNAMIC,
                 max_value: float = 1.0, percentile: float = 0.995):
        super().__init__()
        self.inner, self.mode, self.max_value, self.percentile = denoiser, ThresholdMode(mode), max_value, percentile

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        return threshold_x0(self.inner(x, sigma, **kwargs), self.mode, self.max_value, self.percentile)


class MaskedDenoiser(nn.Module):
    """Inpainting by x0 replacement: where `mask` is 1 the x0 estimate is the known `x0_known`, elsewhere the model's.

    Works with every sampler, and the known region of the result is exactly `x0_known`. CompVis'
    own inpainting (re-noise the known latents to each step's level and blend them into x_t) is the
    `mask`/`x0` option of the DDIMSampler and PLMSSampler shells.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], mask: torch.Tensor, x0_known: torch.Tensor):
        super().__init__()
        self.inner, self.mask, self.x0_known = denoiser, mask, x0_known

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        x0 = self.inner(x, sigma, **kwargs)
        return self.mask * self.x0_known + (1 - self.mask) * x0


def img2img_start(x0: torch.Tensor, sigmas: torch.Tensor, strength: float, noise: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDEdit (Meng et al. 2022): (VP sample of x0 noised to the start level, the remaining sigmas).

    As CompVis and diffusers, int(strength * steps) of the `steps` = len(sigmas) - 1 steps are run.
    """
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must lie in (0, 1], got {strength}")
    steps = len(sigmas) - 1
    run = int(strength * steps)
    if run < 1:
        raise InputError(f"strength {strength} with {steps} steps runs int({strength} * {steps}) = 0 denoising steps: "
                         f"raise the strength or the steps")
    sig = sigmas[steps - run:]
    return (x0 + noise * sig[0]) * torch.rsqrt(1 + sig[0] ** 2), sig
