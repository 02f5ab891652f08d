"""Inpainting with any LDM: a dedicated inpainting model (SD2 `LatentInpaintDiffusion`, or the paper's concat model),
or any other model through known-region replacement (with optional RePaint resampling); the unmasked pixels of
the result are the input's, exactly (final paste in pixel space)."""
from __future__ import annotations

import contextlib
from enum import Enum
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ldm.errors import InputError
from ldm.data.inpainting import MaskConvention, masked_inputs
from ldm.inference import generators, uses_text
from ldm.precision import Precision, precision_scope
from ldm.models.diffusion.latent import Encoding, resize_mask, unscaled_latents
from ldm.sampling import CFGDenoiser, get_sigmas, inpaint_sample, randn_like, sample


class InpaintMode(str, Enum):
    """How a model inpaints: SD2-style inpainting model, the paper's concat model, or known-region replacement."""
    MODEL = "model"        # LatentInpaintDiffusion: mask and masked-image latent concatenated to the UNet input
    PAPER = "paper"        # LatentDiffusion with cond_stage_key masked_image (CompVis inpainting_big)
    REPLACE = "replace"    # any LDM: the known latents replace the sample's known region at every step


def inpaint_mode(model) -> InpaintMode:
    """Which way `model` inpaints."""
    from ldm.models.diffusion.inpaint import LatentInpaintDiffusion

    if isinstance(model, LatentInpaintDiffusion):
        return InpaintMode.MODEL
    if (getattr(model, "cond_stage_key", None) == "masked_image" and model.model.conditioning_key == "concat"
            and model.cond_stage_model is model.first_stage_model):
        return InpaintMode.PAPER
    return InpaintMode.REPLACE


def check_mask(image: torch.Tensor, mask: torch.Tensor) -> None:
    """Refuse a mask that does not cover its image: (B or 1, 1, H, W) for an image (B, C, H, W)."""
    if image.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:] \
            or mask.shape[0] not in (1, image.shape[0]):
        raise InputError(f"mask {tuple(mask.shape)} does not fit image {tuple(image.shape)}: a mask is (B, 1, H, W) "
                         f"with the image's B (or 1), H and W")


def latent_known_region(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """1 where a latent pixel sees no masked pixel at all (area downsampling), so every hole pixel is regenerated."""
    return (F.interpolate(mask.float(), size=tuple(size), mode="area") <= 0).float()


def inpainting_conditioning(model, image: torch.Tensor, mask: torch.Tensor, text, uc_text, mode: InpaintMode):
    """(cond, uncond) of an inpainting model for `image` with `mask` (1 = fill): the mask and the masked image's
    latent, in the model's convention and order, plus the text (guidance drops the text only)."""
    if mode is InpaintMode.MODEL:
        mask_in, masked = masked_inputs(image, mask, model.mask_convention)
        latent = model.encode_latents(masked)
        parts = [latent if k == model.masked_image_key else resize_mask(mask_in, latent.shape[-2:])
                 for k in model.concat_keys]
        cond = model._with_concat(text, torch.cat(parts, 1))
        return cond, (model._with_concat(uc_text, cond["c_concat"][0]) if uc_text is not None else None)
    mask_in, masked = masked_inputs(image, mask, MaskConvention.COMPVIS)  # the paper's model (CompVis inpaint.py)
    latent = unscaled_latents(model.cond_stage_model.encode(masked), Encoding.MODE)
    return torch.cat([latent, resize_mask(mask_in, latent.shape[-2:])], 1), None


@torch.no_grad()
def inpaint(model, image: torch.Tensor, mask: torch.Tensor, prompts: Optional[Sequence[str]] = None, *, steps: int = 50,
            sampler: str = "ddim", scale: Optional[float] = None, seed: Union[int, Sequence[int]] = 0,
            mode: Optional[Union[InpaintMode, str]] = None, jump_length: int = 1, jump_n_sample: int = 1,
            use_ema: bool = True, precision: Union[Precision, str] = Precision.FP32, **sampler_options) -> torch.Tensor:
    """Fill the masked pixels of `image` (B, C, H, W in [-1, 1]; `mask` (B, 1, H, W), 1 = fill); returns images in [-1, 1].

    `prompts` for text-conditioned models; `scale` the guidance scale (default: the model's); `mode`
    forces known-region replacement (`replace`) on an inpainting model too; `jump_length` /
    `jump_n_sample` add RePaint resampling to known-region replacement.
    """
    check_mask(image, mask)
    mode = inpaint_mode(model) if mode is None else InpaintMode(mode)
    if mode is not InpaintMode.REPLACE and mode is not inpaint_mode(model):
        native = inpaint_mode(model).value
        raise InputError(f"inpainting mode '{mode.value}' needs a model with those inputs; this {type(model).__name__} "
                         f"inpaints as '{native}'" + ("" if native == InpaintMode.REPLACE.value else " (or 'replace')"))
    device = model.device
    image, mask = image.to(device).float(), (mask.to(device).float() > 0.5).float()
    n = image.shape[0]
    if uses_text(model):
        if prompts is None or len(prompts) != n:
            raise InputError(f"this model is text-conditioned: give one prompt per image ({n}), got "
                             f"{None if prompts is None else len(prompts)}")
    scale = model.guidance_scale if scale is None else scale
    g = generators(seed, device)
    ctx = model.ema_scope("inpainting") if use_ema else contextlib.nullcontext()
    with ctx, precision_scope(precision, device):
        z0 = model.encode_latents(image) if mode is InpaintMode.REPLACE else None
        text = uc_text = None
        if uses_text(model):
            text = model.get_learned_conditioning(list(prompts))
            uc_text = model.get_learned_conditioning([""] * n) if scale != 1.0 else None
        native = inpaint_mode(model)
        if native is InpaintMode.REPLACE:
            cond, uncond, shape = text, uc_text, z0.shape[1:]
        else:  # an inpainting model reads its mask inputs, also when known-region replacement is added
            cond, uncond = inpainting_conditioning(model, image, mask, text, uc_text, native)
            shape = (cond["c_concat"][0] if isinstance(cond, dict) else cond).shape[1:]
        shape = (model.channels, *shape[1:])
        x_T = randn_like(torch.empty((n, *shape), device=device), g)
        den = model.denoiser()
        sigmas = get_sigmas(den.schedule, steps, "uniform").to(device)
        guided = CFGDenoiser(den, scale=scale)
        extra = {"cond": {"c": cond}} | ({"uncond": {"c": uncond}} if uncond is not None else {})
        if mode is InpaintMode.REPLACE:
            known = latent_known_region(mask, z0.shape[-2:])
            z = inpaint_sample(guided, x_T, sigmas, known, z0, sampler, generator=g, extra_args=extra,
                               jump_length=jump_length, jump_n_sample=jump_n_sample, **sampler_options)
        else:
            z = sample(guided, x_T, sigmas, sampler, generator=g, extra_args=extra, **sampler_options)
        decoded = model.decode_first_stage(z.float()).float()
    if decoded.shape[-2:] != image.shape[-2:]:
        decoded = F.interpolate(decoded, size=image.shape[-2:], mode="bicubic", align_corners=False)
    return image * (1.0 - mask) + decoded.clamp(-1, 1) * mask  # the known pixels exactly as given


def inpaint_any_size(model, image: torch.Tensor, mask: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                     **kwargs) -> torch.Tensor:
    """`inpaint` for any image size: a side that is not a multiple of `size_multiple(model)` (first stage and UNet
    downsampling) is resized to the nearest multiple for sampling; the known pixels stay the input's, exactly."""
    from ldm.inference import size_multiple

    check_mask(image, mask)
    f = size_multiple(model)
    h, w = image.shape[-2:]
    th, tw = max(f, round(h / f) * f), max(f, round(w / f) * f)
    mask = (mask.float() > 0.5).float()
    if (th, tw) == (h, w):
        return inpaint(model, image, mask, prompts, **kwargs)
    small = F.interpolate(image.float(), size=(th, tw), mode="bicubic", align_corners=False).clamp(-1, 1)
    small_mask = (F.interpolate(mask, size=(th, tw), mode="area") > 0).float()  # every touched pixel is filled
    out = inpaint(model, small, small_mask, prompts, **kwargs)
    out = F.interpolate(out, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
    image = image.to(out.device).float()
    mask = mask.to(out.device)
    return image * (1.0 - mask) + out * mask
