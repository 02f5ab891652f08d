"""UNet building blocks shared by openaimodel: timestep embedding, N-d conv/pool, normalization."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


# Sinusoidal embedding period (Vaswani et al. 2017), as in CompVis/SD.
MAX_PERIOD = 10000
UNET_NORM_GROUPS = 32


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = MAX_PERIOD,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)] with f_i = exp(-ln(max_period) i / half)."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input and weight dtypes, returned in the input's dtype.

    CompVis' `normalization` upcast only the input, so half-precision weights met a float32 input and
    the op refused the mix. Input and weights of one dtype go to the native kernel, which accumulates
    half-precision inputs in float32 (without a float32 copy of the activations); mixed dtypes are
    computed entirely in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.dtype == x.dtype:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def normalization(channels: int, groups: int = UNET_NORM_GROUPS) -> nn.Module:
    """GroupNorm(32 groups, eps 1e-5) in float32."""
    return GroupNorm32(groups, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """1-, 2- or 3-d convolution."""
    if dims in (1, 2, 3):
        return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """1-, 2- or 3-d average pooling."""
    if dims in (1, 2, 3):
        return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def upsample_nearest(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Nearest-neighbour x2 (3-d: spatial only)."""
    if dims == 3:
        return F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
    return F.interpolate(x, scale_factor=2, mode="nearest")


def to_channels_last(module: nn.Module, dims: int = 2) -> nn.Module:
    """Store the module's conv weights channels-last (2-d: NHWC, 3-d: NDHWC), so convolutions run on that memory.

    A convolution with channels-last weights gives channels-last output whatever its input's layout, so the
    activations follow; oneDNN's CPU convolutions are fastest on this layout (cuDNN documents the same for its
    tensor-core ones). Each weight gets the format of its own rank (a video UNet holds 2-d and 3-d convolutions
    side by side; `Module.to(memory_format=...)` refuses the other rank). `dims` 1 leaves the module as it is.
    Parameter names, shapes and values (the state dict) do not change; `load_state_dict` copies into the layout.
    """
    if dims not in (2, 3):
        return module
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() in formats and p.device.type != "meta":
                p.data = p.data.to(memory_format=formats[p.dim()])  # as Module.to: canonical strides (1x1 too)
    return module
