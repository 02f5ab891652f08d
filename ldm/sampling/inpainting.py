"""Inpainting with any denoiser, no retraining: known-region replacement during sampling, with optional RePaint
resampling (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models")."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ldm.sampling.entry import sample, vp_scale
from ldm.sampling.guidance import MaskedDenoiser
from ldm.sampling.samplers import Callback, Generator, randn_like


class KnownRegionDenoiser(MaskedDenoiser):
    """D(x, sigma) with the known region (`known` = 1) replaced by the known latents `x0_known`, for any sampler.

    On the way in, the known region of x is the known latents re-noised to the current level (the
    CompVis DDIM/PLMS inpainting, x_known = x0 + sigma * noise in VE form); on the way out, the x0
    estimate there is `x0_known` itself, so the sampler's update keeps it where it belongs.
    Fresh noise is drawn from `generator` (one, or one per image) at every call.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], known: torch.Tensor, x0_known: torch.Tensor,
                 generator: Generator = None):
        super().__init__(denoiser, known, x0_known)
        self.generator = generator

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().forward(known_region_blend(x, sigma, self.mask, self.x0_known, self.generator), sigma, **kwargs)


def known_region_blend(x: torch.Tensor, sigma: torch.Tensor, known: torch.Tensor, x0_known: torch.Tensor,
                       generator: Generator = None) -> torch.Tensor:
    """x with its known region (`known` = 1) replaced by the known latents re-noised to sigma (VE form, fresh noise
    from `generator`): CompVis' DDIM / PLMS inpainting, x_known = x0 + sigma * noise."""
    s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) if sigma.dim() > 0 else sigma
    x_known = x0_known + randn_like(x0_known, generator) * s
    return known * x_known + (1.0 - known) * x


def renoise(x_vp: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor, generator: Generator = None
            ) -> torch.Tensor:
    """A VP sample at sigma_from diffused forward to sigma_to >= sigma_from (RePaint's jump back, q(x_t | x_{t-j}))."""
    x = x_vp / vp_scale(sigma_from)
    x = x + randn_like(x, generator) * (sigma_to ** 2 - sigma_from ** 2).clamp_min(0).sqrt()
    return x * vp_scale(sigma_to)


def repaint_schedule(n_steps: int, jump_length: int, jump_n_sample: int) -> list[tuple[int, int]]:
    """The (start, end) step-index segments RePaint walks: each block of `jump_length` steps is run `jump_n_sample`
    times, re-noised back to its start between runs; the last block is run once (no jump back from the end)."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length} and {jump_n_sample}")
    segments = []
    for start in range(0, n_steps, jump_length):
        end = min(start + jump_length, n_steps)
        repeats = 1 if end == n_steps else jump_n_sample
        segments.extend([(start, end)] * repeats)
    return segments


def inpaint_sample(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor, known: torch.Tensor,
                   x0_known: torch.Tensor, sampler: Union[str, Callable] = "ddim", generator: Generator = None,
                   extra_args: Optional[dict] = None, callback: Callback = None, jump_length: int = 1,
                   jump_n_sample: int = 1, **options) -> torch.Tensor:
    """Sample with the known region held to `x0_known` (VP latents in and out, as `ldm.sampling.sample`); the known
    region of the result is `x0_known` exactly.

    `jump_n_sample` > 1 adds RePaint's resampling: every `jump_length` steps the sample is diffused
    back to the block's start level and the block is run again, which harmonises the generated region
    with the known one. Multistep samplers restart their history at each block.
    """
    model = KnownRegionDenoiser(denoiser, known, x0_known, generator)
    segments = repaint_schedule(len(sigmas) - 1, jump_length, jump_n_sample)
    prev: Optional[tuple[int, int]] = None
    for start, end in segments:
        if prev == (start, end):  # the same block again: jump back to its start level first
            x = renoise(x, sigmas[end], sigmas[start], generator)
        x = sample(model, x, sigmas[start:end + 1], sampler, generator=generator, extra_args=extra_args,
                   callback=callback, **options)
        prev = (start, end)
    return known * x0_known + (1.0 - known) * x  # schedules ending above sigma 0 (CompVis DDIM) leave a little noise
