"""CompVis import path of the diffusion models (`target: ldm.models.diffusion.ddpm.LatentDiffusion`); the classes
live in .diffusion_module (DDPM) and .latent (LatentDiffusion)."""
from ldm.models.diffusion.diffusion_module import DDPM, DiffusionWrapper, __conditioning_keys__, disabled_train
from ldm.models.diffusion.latent import LatentDiffusion

__all__ = ["DDPM", "LatentDiffusion", "DiffusionWrapper", "disabled_train", "__conditioning_keys__"]
