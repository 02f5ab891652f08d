"""Noise augmentation of the low-resolution input of a cascaded / upscaling diffusion model (Ho et al. 2022, "Cascaded
Diffusion Models"; Stable Diffusion 2's x4 upscaler): the low-resolution image is diffused to a noise level that
the UNet also receives, as its class label, so at sampling time the user picks how much to trust the input."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from ldm.modules.diffusionmodules.schedule import ddpm_buffers, extract_into_tensor, make_beta_schedule

# the schedule buffers SD2's low-scale model keeps (its checkpoint keys under `low_scale_model.`)
LOW_SCALE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod")


class AbstractLowScaleModel(nn.Module):
    """A DDPM forward process q(x_t | x_0) over the conditioning image (`noise_schedule_config`: CompVis schedule keys)."""

    def __init__(self, noise_schedule_config: Optional[Mapping] = None):
        super().__init__()
        cfg = dict(noise_schedule_config or {})
        unknown = sorted(set(cfg) - {"beta_schedule", "timesteps", "linear_start", "linear_end", "cosine_s"})
        if unknown:
            raise ValueError(f"noise_schedule_config: unknown keys {unknown} (use beta_schedule, timesteps, "
                             f"linear_start, linear_end, cosine_s)")
        betas = make_beta_schedule(cfg.get("beta_schedule", "linear"), int(cfg.get("timesteps", 1000)),
                                   cfg.get("linear_start", 1e-4), cfg.get("linear_end", 2e-2), cfg.get("cosine_s", 8e-3))
        self.num_timesteps = int(len(betas))
        buffers = ddpm_buffers(betas)
        for name in LOW_SCALE_BUFFERS:
            self.register_buffer(name, buffers[name])

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def forward(self, x: torch.Tensor, noise_level: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return x, None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SimpleImageConcat(AbstractLowScaleModel):
    """No augmentation: the low-resolution image as it is, noise level 0."""

    def __init__(self) -> None:
        super().__init__({"timesteps": 1})

    def forward(self, x: torch.Tensor, noise_level: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros(x.shape[0], device=x.device, dtype=torch.long)


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """The image diffused to `noise_level` (drawn uniformly in [0, max_noise_level) when not given), and that level."""

    def __init__(self, noise_schedule_config: Optional[Mapping] = None, max_noise_level: int = 1000,
                 to_rgb: bool = False):
        super().__init__(noise_schedule_config)
        if not 0 < max_noise_level <= self.num_timesteps:
            raise ValueError(f"max_noise_level {max_noise_level} must lie in (0, {self.num_timesteps}] "
                             f"(the noise schedule's timesteps)")
        if to_rgb:
            raise NotImplementedError("ImageConcatWithNoiseAugmentation(to_rgb=True) is not provided")
        self.max_noise_level = int(max_noise_level)

    def forward(self, x: torch.Tensor, noise_level: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device, generator=generator)
        noise_level = torch.as_tensor(noise_level, device=x.device).long().expand(x.shape[0]).contiguous()
        if (noise_level < 0).any() or (noise_level >= self.num_timesteps).any():
            raise ValueError(f"noise_level must lie in [0, {self.num_timesteps - 1}], got {noise_level.tolist()}")
        return self.q_sample(x, noise_level, generator=generator), noise_level
