"""The guidance weight as a network input (Meng et al. 2023, "On distillation of guided diffusion models", sec. 4.1)."""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.attention import zero_module
from ldm.modules.diffusionmodules.util import linear, timestep_embedding

# w is multiplied by this before its sinusoidal features: guidance scales 0..10 then span the argument range
# 0..1000 that timesteps use, so the same feature frequencies resolve them.
GUIDANCE_FEATURE_SCALE = 100.0


class GuidanceEmbedding(nn.Module):
    """Sinusoidal features of the guidance scale w through an MLP whose last layer starts at zero.

    Its output is added to the UNet's time embedding; at initialisation it adds nothing, so a student
    built from a teacher starts as the teacher's conditional model whatever w it is given.
    """

    def __init__(self, feature_dim: int, embed_dim: int, feature_scale: float = GUIDANCE_FEATURE_SCALE):
        super().__init__()
        self.feature_dim, self.feature_scale = feature_dim, feature_scale
        self.mlp = nn.Sequential(linear(feature_dim, embed_dim), nn.SiLU(), zero_module(linear(embed_dim, embed_dim)))

    def forward(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        features = timestep_embedding(w.float() * self.feature_scale, self.feature_dim)
        return self.mlp(features.to(dtype))
