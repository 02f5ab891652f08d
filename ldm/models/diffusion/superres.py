"""LatentUpscaleDiffusion (Stable Diffusion 2's x4 upscaler): the latent of the high-resolution image is denoised
with the noise-augmented low-resolution image concatenated on channels and the augmentation level given to the
UNet as its class label (`hybrid-adm`), text by cross-attention."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ldm.errors import InputError
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.modules.model_inputs import ConditionInput, ConditionValues
from ldm.util import instantiate_from_config


class LatentUpscaleDiffusion(LatentDiffusion):
    """`low_scale_config` builds the low-scale model (ldm.modules.diffusionmodules.upscaling); `low_scale_key` names
    the low-resolution image (B, H, W, C in [-1, 1]) in the batch."""

    def __init__(self, *args: Any, low_scale_config=None, low_scale_key: str = "LR",
                 noise_level_key: Optional[str] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ValueError("LatentUpscaleDiffusion: cond_stage_trainable must be false (as in Stable Diffusion 2)")
        if low_scale_config is None:
            raise ValueError("LatentUpscaleDiffusion: low_scale_config is required (e.g. target: "
                             "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation)")
        self.low_scale_model = instantiate_from_config(low_scale_config, key="model.params.low_scale_config").eval()
        for p in self.low_scale_model.parameters():
            p.requires_grad = False
        self.low_scale_key, self.noise_level_key = low_scale_key, noise_level_key

    def low_scale_conditioning(self, x_low: torch.Tensor, noise_level: Union[None, int, torch.Tensor] = None,
                               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the augmented low-resolution image, its noise level): drawn at random when `noise_level` is None."""
        if noise_level is not None:
            noise_level = torch.as_tensor(noise_level, device=x_low.device)
        return self.low_scale_model(x_low.float(), noise_level=noise_level, generator=generator)

    def _conds(self, c: Any, zx: torch.Tensor, noise_level: torch.Tensor) -> dict:
        conds: dict = {"c_concat": [zx], "c_adm": noise_level}
        if self.model.conditioning_key.reads_text:
            conds["c_crossattn"] = [c]
        return conds

    # -- conditioning for sampling --------------------------------------------------------------
    @property
    def condition_inputs(self) -> frozenset[ConditionInput]:
        """The low-resolution image and its augmentation level, and the prompts when the UNet reads text."""
        text = {ConditionInput.PROMPTS} if self.model.conditioning_key.reads_text else set()
        return frozenset({ConditionInput.LOW_RES, ConditionInput.NOISE_LEVEL, *text})

    def condition_parts(self, given: ConditionValues, guidance: bool) -> tuple[dict, dict]:
        """The low-resolution image noise-augmented to `noise_level` (each image from its own generator when a list
        is given) and the level as the UNet's class label, plus the text; guidance nulls the text only."""
        low_res, noise_level, generator = given.low_res, given.noise_level, given.generator
        n = low_res.shape[0]
        top = self.low_scale_model.max_noise_level
        if not 0 <= int(noise_level) < top:
            raise InputError(f"noise_level {noise_level} must lie in [0, {top - 1}] (Stable Diffusion 2 suggests 20)")
        level = torch.full((n,), int(noise_level), device=low_res.device, dtype=torch.long)
        if isinstance(generator, (list, tuple)):  # each image's augmentation noise from its own generator
            parts = [self.low_scale_conditioning(low_res[j:j + 1], level[j:j + 1], generator=g)
                     for j, g in enumerate(generator)]
            zx, level = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            zx, level = self.low_scale_conditioning(low_res, level, generator=generator)
        c = uc = None
        if ConditionInput.PROMPTS in self.condition_inputs:
            c, uc = self.guidance_pair(list(given.prompts), guidance)
        return self._conds(c, zx, level), ({"c_crossattn": [uc]} if uc is not None else {})

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
                  cond_key: Optional[str] = None, return_original_cond: bool = False, bs: Optional[int] = None,
                  drop_cond: float = 0.0):
        out = super().get_input(batch, k, return_first_stage_outputs=return_first_stage_outputs, force_c_encode=True,
                                return_original_cond=return_original_cond, bs=bs, drop_cond=drop_cond)
        if self.low_scale_key not in batch:
            raise KeyError(f"batch has no key '{self.low_scale_key}' (low_scale_key); keys: {sorted(batch)}")
        x_low = super(LatentDiffusion, self).get_input(batch, self.low_scale_key).to(self.device)
        x_low = x_low[:bs] if bs is not None else x_low
        level = None
        if self.noise_level_key is not None:
            level = torch.as_tensor(batch[self.noise_level_key], device=self.device).long()[:x_low.shape[0]]
        zx, noise_level = self.low_scale_conditioning(x_low, level)
        out[1] = self._conds(out[1], zx, noise_level)
        return out

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The LatentDiffusion images plus the low-resolution input."""
        log = super().log_images(batch, N, *args, **kwargs)
        log["low_resolution_input"] = super(LatentDiffusion, self).get_input(batch, self.low_scale_key)[:N]
        return log
