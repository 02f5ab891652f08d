"""Inpainting with any LDM: a dedicated inpainting model (SD2 `LatentInpaintDiffusion`, or the paper's concat model),
or any other model through known-region replacement (with optional RePaint resampling); the unmasked pixels of
the result are the input's, exactly (final paste in pixel space)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ldm import generation
from ldm.errors import InputError
from ldm.generation import Seed, generators, reads, sampling_scope, size_multiple
from ldm.modules.model_inputs import ConditionInput, InpaintMode
from ldm.precision import Precision
from ldm.sampling import Spacing


def inpaint_mode(model) -> InpaintMode:
    """Which way `model` inpaints (the model kind answers: `model.inpaint_mode`)."""
    return getattr(model, "inpaint_mode", InpaintMode.REPLACE)


def check_mask(image: torch.Tensor, mask: torch.Tensor) -> None:
    """Refuse a mask that does not cover its image: (B or 1, 1, H, W) for an image (B, C, H, W)."""
    if image.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:] \
            or mask.shape[0] not in (1, image.shape[0]):
        raise InputError(f"mask {tuple(mask.shape)} does not fit image {tuple(image.shape)}: a mask is (B, 1, H, W) "
                         f"with the image's B (or 1), H and W")


@torch.no_grad()
def inpaint(model, image: torch.Tensor, mask: torch.Tensor, prompts: Optional[Sequence[str]] = None, *, steps: int = 50,
            sampler: str = "ddim", scale: Optional[float] = None, seed: Seed = 0,
            mode: Optional[Union[InpaintMode, str]] = None, jump_length: int = 1, jump_n_sample: int = 1,
            use_ema: bool = True, precision: Union[Precision, str] = Precision.FP32,
            spacing: Optional[Union[Spacing, str]] = None, rescale: float = 0.0, **sampler_options) -> torch.Tensor:
    """Fill the masked pixels of `image` (B, C, H, W in [-1, 1]; `mask` (B, 1, H, W), 1 = fill); returns images in [-1, 1].

    `prompts` for text-conditioned models; `scale` the guidance scale (default: the model's) and
    `rescale` its rescale; `mode` forces known-region replacement (`replace`) on an inpainting model too;
    `jump_length` / `jump_n_sample` add RePaint resampling to known-region replacement.
    """
    check_mask(image, mask)
    native = inpaint_mode(model)
    mode = native if mode is None else InpaintMode(mode)
    if mode is not InpaintMode.REPLACE and mode is not native:
        raise InputError(f"inpainting mode '{mode.value}' needs a model with those inputs; this {type(model).__name__} "
                         f"inpaints as '{native.value}'" + ("" if native is InpaintMode.REPLACE else " (or 'replace')"))
    device = model.device
    image, mask = image.to(device).float(), (mask.to(device).float() > 0.5).float()
    n = image.shape[0]
    if reads(model, ConditionInput.PROMPTS) and (prompts is None or len(prompts) != n):
        raise InputError(f"this model is text-conditioned: give one prompt per image ({n}), got "
                         f"{None if prompts is None else len(prompts)}")
    scale = model.guidance_scale if scale is None else scale
    g = generators(seed, device)
    with sampling_scope(model, use_ema, precision, "inpainting"):
        # an inpainting model reads its mask inputs, also when known-region replacement is added
        cond = model.conditioning(prompts=None if prompts is None else list(prompts), image=image, mask=mask,
                                  guidance=generation.needs_unconditional(model, scale))
        replace = mode is InpaintMode.REPLACE
        decoded = generation.generate(model, cond, n, image=image, mask=mask if replace else None, steps=steps,
                                      sampler=sampler, scale=scale, rescale=rescale, spacing=spacing, generator=g,
                                      jump_length=jump_length, jump_n_sample=jump_n_sample, **sampler_options)
    if decoded.shape[-2:] != image.shape[-2:]:
        decoded = F.interpolate(decoded, size=image.shape[-2:], mode="bicubic", align_corners=False)
    return image * (1.0 - mask) + decoded.clamp(-1, 1) * mask  # the known pixels exactly as given


def inpaint_any_size(model, image: torch.Tensor, mask: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                     **kwargs) -> torch.Tensor:
    """`inpaint` for any image size: a side that is not a multiple of `size_multiple(model)` (first stage and UNet
    downsampling) is resized to the nearest multiple for sampling; the known pixels stay the input's, exactly."""
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
