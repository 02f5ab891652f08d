"""The merge of a spatial and a temporal layer's outputs, alpha * spatial + (1 - alpha) * temporal (Blattmann et al.
2023, "Align your Latents", sec. 3.1; sgm's `AlphaBlender` key `mix_factor`)."""
from __future__ import annotations

from enum import Enum
from typing import Optional

import torch
from einops import rearrange
from torch import nn


class MergeStrategy(str, Enum):
    """How alpha is set: a fixed buffer, sigmoid of a learned scalar, or that with alpha = 1 for single images."""

    FIXED = "fixed"
    LEARNED = "learned"
    LEARNED_WITH_IMAGES = "learned_with_images"

    @classmethod
    def named(cls, value: str, where: str) -> "MergeStrategy":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{where}: merge_strategy {value!r} is not one of "
                             f"{[m.value for m in cls]}") from None


class AlphaBlender(nn.Module):
    """alpha * x_spatial + (1 - alpha) * x_temporal; `rearrange_pattern` maps the per-item alpha (b t) onto x."""

    def __init__(self, alpha: float, merge_strategy: str = MergeStrategy.LEARNED_WITH_IMAGES.value,
                 rearrange_pattern: str = "b t -> (b t) 1 1"):
        super().__init__()
        self.merge_strategy = MergeStrategy.named(merge_strategy, "AlphaBlender")
        self.rearrange_pattern = rearrange_pattern
        factor = torch.tensor([float(alpha)])
        if self.merge_strategy is MergeStrategy.FIXED:
            self.register_buffer("mix_factor", factor)  # alpha itself
        else:
            self.mix_factor = nn.Parameter(factor)  # alpha = sigmoid(mix_factor)

    def alpha(self, image_only_indicator: Optional[torch.Tensor]) -> torch.Tensor:
        """alpha, a scalar or (with images) one per frame arranged as the pattern says."""
        if self.merge_strategy is MergeStrategy.FIXED:
            return self.mix_factor
        learned = torch.sigmoid(self.mix_factor)
        if self.merge_strategy is MergeStrategy.LEARNED:
            return learned
        if image_only_indicator is None:
            raise ValueError("AlphaBlender (merge_strategy learned_with_images) needs image_only_indicator, (b, t) with "
                             "1 where an item is a single image: give it to the video UNet")
        per_frame = torch.where(image_only_indicator.bool(), torch.ones_like(learned), learned)
        return rearrange(per_frame, self.rearrange_pattern)

    def forward(self, x_spatial: torch.Tensor, x_temporal: torch.Tensor,
                image_only_indicator: Optional[torch.Tensor] = None) -> torch.Tensor:
        alpha = self.alpha(image_only_indicator).to(x_spatial.dtype)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal
