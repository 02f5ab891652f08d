"""CompVis import path of the diffusion models (`target: ldm.models.diffusion.ddpm.LatentDiffusion`); the classes
live in .diffusion_module (DDPM), .latent (LatentDiffusion), .inpaint (LatentInpaintDiffusion) and .superres
(LatentUpscaleDiffusion)."""
from ldm.models.diffusion.diffusion_module import (DDPM, ConditioningKey, DiffusionWrapper, __conditioning_keys__,
                                                   disabled_train)
from ldm.models.diffusion.inpaint import LatentInpaintDiffusion
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.models.diffusion.superres import LatentUpscaleDiffusion

__all__ = ["DDPM", "LatentDiffusion", "LatentInpaintDiffusion", "LatentUpscaleDiffusion", "DiffusionWrapper",
           "ConditioningKey", "disabled_train", "__conditioning_keys__"]
