"""LatentInpaintDiffusion (Stable Diffusion 2 inpainting): the UNet reads the noisy latent, the mask and the
masked image's latent concatenated on channels (4 + 1 + 4 on KL-f8), text by cross-attention (`hybrid`).

Fine-tuning from a text-to-image checkpoint (the SD inpainting recipe) widens the `finetune_keys`
(the first convolution) with zero weights for the new input channels, so the widened model starts
as the text-to-image model it was loaded from.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from ldm.models.diffusion.diffusion_module import ConditioningKey
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.modules.model_inputs import (ConditionInput, ConditionValues, InpaintMode, MaskConvention, masked_inputs,
                                      resize_mask)

logger = logging.getLogger(__name__)

FIRST_CONV_KEYS = ("model.diffusion_model.input_blocks.0.0.weight", "model_ema.diffusion_modelinput_blocks00weight")


def widen_input_channels(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], keys: Sequence[str],
                         keep_dims: int) -> list[str]:
    """In place: each of `keys` whose checkpoint tensor has fewer input channels than the model's becomes the model's
    shape, zero except for the first `keep_dims` input channels copied from the checkpoint. Returns the widened keys."""
    widened = []
    for k in keys:
        if k not in sd or k not in own or sd[k].shape == own[k].shape:
            continue
        old, new = sd[k], own[k]
        if old.dim() != new.dim() or old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:]:
            raise ValueError(f"finetune key {k}: checkpoint {tuple(old.shape)} cannot be widened to {tuple(new.shape)}")
        if old.shape[1] < keep_dims:
            raise ValueError(f"finetune key {k}: checkpoint has {old.shape[1]} input channels, keep_finetune_dims "
                             f"is {keep_dims}")
        wide = torch.zeros(new.shape, dtype=old.dtype)
        wide[:, :keep_dims] = old[:, :keep_dims]
        sd[k] = wide
        widened.append(f"{k}: {tuple(old.shape)} -> {tuple(new.shape)}")
    return widened


class LatentInpaintDiffusion(LatentDiffusion):
    """LDM whose UNet also reads `concat_keys` (default: the mask, then the masked image's latent)."""

    def __init__(self, *args: Any, concat_keys: Sequence[str] = ("mask", "masked_image"),
                 masked_image_key: str = "masked_image", finetune_keys: Optional[Sequence[str]] = FIRST_CONV_KEYS,
                 keep_finetune_dims: int = 4, c_concat_log_start: Optional[int] = None,
                 c_concat_log_end: Optional[int] = None, mask_convention: str = MaskConvention.SD.value,
                 **kwargs: Any):
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        super().__init__(*args, **kwargs)
        if self.model.conditioning_key not in (ConditioningKey.CONCAT, ConditioningKey.HYBRID):
            raise ValueError(f"LatentInpaintDiffusion: conditioning_key must be 'hybrid' (text + concat) or 'concat', "
                             f"got '{getattr(self.model.conditioning_key, 'value', None)}'")
        self.concat_keys, self.masked_image_key = tuple(concat_keys), masked_image_key
        self.finetune_keys = tuple(finetune_keys or ())
        self.keep_finetune_dims = keep_finetune_dims
        self.c_concat_log_start, self.c_concat_log_end = c_concat_log_start, c_concat_log_end
        self.mask_convention = MaskConvention(mask_convention)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    # -- checkpoint -----------------------------------------------------------------------------
    def adapt_loaded_state_dict(self, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """A text-to-image checkpoint gets its `finetune_keys` widened (zeros for the new input channels), logged."""
        for line in widen_input_channels(sd, self.state_dict(), self.finetune_keys, self.keep_finetune_dims):
            logger.info("%s: widened %s (new input channels zero-initialised)", source, line)
        return sd

    # -- conditioning ---------------------------------------------------------------------------
    def concat_conditioning(self, batch: dict, z_shape: torch.Size, bs: Optional[int] = None) -> torch.Tensor:
        """The `concat_keys` of `batch` at the latent size: masks resampled, the masked image encoded."""
        parts = []
        for key in self.concat_keys:
            if key not in batch:
                raise KeyError(f"batch has no key '{key}' (concat_keys of {type(self).__name__}); keys: {sorted(batch)}")
            cc = super(LatentDiffusion, self).get_input(batch, key).to(self.device)
            cc = cc[:bs] if bs is not None else cc
            if key == self.masked_image_key:
                cc = self.get_first_stage_encoding(self.encode_first_stage(cc))
            else:
                cc = resize_mask(cc, z_shape[-2:])
            parts.append(cc)
        return torch.cat(parts, dim=1)

    def _with_concat(self, c: Any, c_cat: torch.Tensor) -> dict:
        if self.model.conditioning_key is ConditioningKey.CONCAT:
            return {"c_concat": [c_cat]}
        return {"c_concat": [c_cat], "c_crossattn": [c]}

    # -- conditioning for sampling --------------------------------------------------------------
    @property
    def condition_inputs(self) -> frozenset[ConditionInput]:
        """An image and its mask, and the prompts when the UNet reads text (`hybrid`)."""
        text = {ConditionInput.PROMPTS} if self.model.conditioning_key.reads_text else set()
        return frozenset({ConditionInput.MASK, *text})

    @property
    def inpaint_mode(self) -> InpaintMode:
        return InpaintMode.MODEL

    def condition_parts(self, given: ConditionValues, guidance: bool) -> tuple[dict, dict]:
        """The mask and the masked image's latent (mode) in `concat_keys` order and this model's mask convention,
        plus the text; guidance nulls the text only."""
        image, mask = given.image, given.mask
        mask_in, masked = masked_inputs(image, self._fill_all(image) if mask is None else mask, self.mask_convention)
        latent = self.encode_latents(masked)
        parts = [latent if k == self.masked_image_key else resize_mask(mask_in, latent.shape[-2:])
                 for k in self.concat_keys]
        c = uc = None
        if ConditionInput.PROMPTS in self.condition_inputs:
            c, uc = self.guidance_pair(list(given.prompts), guidance)
        cond = self._with_concat(c, torch.cat(parts, 1))
        return cond, ({"c_crossattn": [uc]} if uc is not None else {})

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
                  cond_key: Optional[str] = None, return_original_cond: bool = False, bs: Optional[int] = None,
                  drop_cond: float = 0.0):
        if self.model.conditioning_key is ConditioningKey.CONCAT:  # no text: the concat inputs are the whole condition
            z = self.get_first_stage_encoding(self.encode_batch(batch, k, bs)).detach()
            out = [z, None]
            if return_first_stage_outputs:
                out.extend([super(LatentDiffusion, self).get_input(batch, k).to(self.device)[:bs],
                            self.decode_first_stage(z)])
            if return_original_cond:
                out.append(None)
        else:
            out = super().get_input(batch, k, return_first_stage_outputs=return_first_stage_outputs,
                                    force_c_encode=force_c_encode, return_original_cond=return_original_cond, bs=bs,
                                    drop_cond=drop_cond)
        out[1] = self._with_concat(out[1], self.concat_conditioning(batch, out[0].shape, bs))
        return out

    def shared_step(self, batch: dict):
        z, c = self.get_input(batch, self.first_stage_key, drop_cond=self.ucg_rate if self.training else 0.0)
        if self.cond_stage_trainable and "c_crossattn" in c:
            with torch.enable_grad():
                c["c_crossattn"] = [self.get_learned_conditioning(c["c_crossattn"][0])]
        return self.p_losses(z, c, sample_weights=self.item_weights(batch))

    # -- images ---------------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The LatentDiffusion images plus the mask and the masked image (the inpainting inputs)."""
        log = super().log_images(batch, N, *args, **kwargs)
        mask = super(LatentDiffusion, self).get_input(batch, "mask")[:N].to(self.device)
        log["mask"] = mask * 2.0 - 1.0 if self.mask_convention is MaskConvention.SD else mask
        log["masked_image"] = super(LatentDiffusion, self).get_input(batch, self.masked_image_key)[:N].to(self.device)
        return log
