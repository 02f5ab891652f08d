"""Super-resolution with an LDM that reads the low-resolution image concatenated to its latent: the paper's LDM-SR
(LatentDiffusion, concat) and Stable Diffusion 2's x4 upscaler (LatentUpscaleDiffusion, noise-augmented, with a
user-chosen noise level). Inputs larger than the model's size are processed in overlapping tiles blended with
weights that fall off towards each tile's edge, so memory stays bounded and no seams show."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch

from ldm import generation
from ldm.errors import InputError
from ldm.generation import first_stage_factor, reads, sampling_scope, size_multiple
from ldm.modules.model_inputs import ConditionInput
from ldm.precision import Precision
from ldm.sampling import Spacing


def check_superres_model(model) -> None:
    """Refuse a model that does not upscale (one that reads no low-resolution image): neither an x4 upscaler nor a
    paper LDM-SR / BSR model."""
    if not reads(model, ConditionInput.LOW_RES):
        key = getattr(getattr(model, "model", None), "conditioning_key", None)
        raise InputError(f"this {type(model).__name__} (conditioning '{getattr(key, 'value', key)}', cond_stage_key "
                         f"'{getattr(model, 'cond_stage_key', None)}') is not a super-resolution model: give an x4 "
                         f"upscaler (LatentUpscaleDiffusion) or a paper LDM-SR / BSR model (concat conditioning on "
                         f"cond_stage_key LR_image or lr)")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` shared pixels."""
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise InputError(f"overlap {overlap} must lie in [0, tile size {tile})")
    n = -(-(length - overlap) // (tile - overlap))  # ceil
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def blend_weights(h: int, w: int, ramp: int, device=None) -> torch.Tensor:
    """(1, 1, h, w) weights: 1 in the interior, falling linearly to 1 / (ramp + 1) over `ramp` pixels at each edge."""
    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device, dtype=torch.float32)
        return torch.minimum(torch.minimum(i + 1, n - i), torch.tensor(float(ramp + 1), device=device)) / (ramp + 1)

    return (axis(h)[:, None] * axis(w)[None, :])[None, None]


@torch.no_grad()
def upscale_tile(model, lr: torch.Tensor, *, steps: int, sampler: str, generator, prompts: Optional[Sequence[str]],
                 scale: float, noise_level: Optional[int], spacing: Optional[Union[Spacing, str]] = None,
                 rescale: float = 0.0, **sampler_options) -> torch.Tensor:
    """One batch of low-resolution tiles (B, 3, h, w in [-1, 1]) -> decoded images (B, 3, f h, f w)."""
    cond = model.conditioning(prompts=None if prompts is None else list(prompts), low_res=lr, noise_level=noise_level,
                              guidance=generation.needs_unconditional(model, scale), generator=generator)
    return generation.generate(model, cond, lr.shape[0], steps=steps, sampler=sampler, scale=scale, rescale=rescale,
                               spacing=spacing, generator=generator, **sampler_options)


def _tiles(h: int, w: int, tile: int, overlap: int) -> Iterator[tuple[int, int]]:
    for top in tile_starts(h, tile, overlap):
        for left in tile_starts(w, tile, overlap):
            yield top, left


@torch.no_grad()
def upscale(model, lr: torch.Tensor, prompts: Optional[Sequence[str]] = None, *, steps: int = 50,
            sampler: str = "ddim", seed: int = 0, scale: Optional[float] = None, noise_level: Optional[int] = None,
            tile: Optional[int] = None, overlap: Optional[int] = None, tile_batch: int = 8, use_ema: bool = True,
            precision: Union[Precision, str] = Precision.FP32, spacing: Optional[Union[Spacing, str]] = None,
            rescale: float = 0.0, **sampler_options) -> torch.Tensor:
    """Upscale `lr` (B, 3, h, w in [-1, 1]) by the model's factor, tile by tile where it exceeds `tile` (low-resolution
    pixels; default: the model's latent size), tiles overlapping by `overlap` (default tile // 4).

    Each tile is sampled from its own generator (seed + tile index), so a result does not depend on
    `tile_batch`; an input that fits in one tile is sampled exactly as without tiling. `noise_level`:
    the augmentation level of an x4 upscaler (LatentUpscaleDiffusion); required there.
    """
    check_superres_model(model)
    if reads(model, ConditionInput.NOISE_LEVEL) and noise_level is None:
        raise InputError("this model is noise-augmented (LatentUpscaleDiffusion): give a noise_level "
                         f"(0 to {model.low_scale_model.max_noise_level - 1}; Stable Diffusion 2 suggests 20)")
    device, f = model.device, first_stage_factor(model)  # the low-resolution image has the latent's size
    tile = int(tile or model.image_size)
    overlap = tile // 4 if overlap is None else int(overlap)
    scale = model.guidance_scale if scale is None else scale
    b, _, h0, w0 = lr.shape
    lr = lr.to(device).float()
    m = size_multiple(model) // f  # the UNet's downsampling, in input pixels
    pad_h, pad_w = -h0 % m, -w0 % m
    if pad_h or pad_w:  # edge-pad to a size the UNet takes; the padding is cropped off the output
        lr = torch.nn.functional.pad(lr, (0, pad_w, 0, pad_h), mode="replicate")
    h, w = lr.shape[-2:]
    out = torch.zeros(b, 3, h * f, w * f, device=device)
    norm = torch.zeros(1, 1, h * f, w * f, device=device)
    places = list(_tiles(h, w, tile, overlap))
    with sampling_scope(model, use_ema, precision, "superres"):
        jobs = [(i, k, top, left) for i in range(b) for k, (top, left) in enumerate(places)]
        for start in range(0, len(jobs), tile_batch):
            chunk = jobs[start:start + tile_batch]
            crops = torch.cat([lr[i:i + 1, :, top:top + tile, left:left + tile] for i, _, top, left in chunk])
            gens = [torch.Generator(device=device).manual_seed(seed + i * len(places) + k) for i, k, _, _ in chunk]
            texts = [prompts[i] for i, _, _, _ in chunk] if prompts is not None else None
            hr = upscale_tile(model, crops, steps=steps, sampler=sampler, generator=gens, prompts=texts, scale=scale,
                              noise_level=noise_level, spacing=spacing, rescale=rescale, **sampler_options)
            for (i, _, top, left), img in zip(chunk, hr):
                th, tw = img.shape[-2:]
                wgt = blend_weights(th, tw, overlap * f, device) if len(places) > 1 else torch.ones(1, 1, th, tw,
                                                                                                     device=device)
                out[i:i + 1, :, top * f:top * f + th, left * f:left * f + tw] += img[None] * wgt
                if i == 0:
                    norm[:, :, top * f:top * f + th, left * f:left * f + tw] += wgt
    return (out / norm).clamp(-1, 1)[..., :h0 * f, :w0 * f]
