"""ldm: Latent Diffusion Models (Rombach et al., CVPR 2022) on Lightning 2.x."""

__version__ = "0.1.0"
