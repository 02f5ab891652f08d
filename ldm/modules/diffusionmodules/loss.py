"""Denoising loss as a callable given the network, with timestep sampling and loss weighting as separate objects."""
from __future__ import annotations

from enum import Enum
from typing import Optional, Union

import torch

from ldm.modules.diffusionmodules.parameterization import Parameterization


class LossType(str, Enum):
    """Element-wise regression loss (CompVis `loss_type`)."""
    L2 = "l2"
    L1 = "l1"


def elementwise_loss(kind: Union[LossType, str], pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    kind = LossType(kind)
    return (pred - target).pow(2) if kind is LossType.L2 else (pred - target).abs()


class UniformTimesteps:
    """t ~ U{0, ..., T-1} (Ho et al. 2020)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def __call__(self, n: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator).long()


class SimpleWeighting:
    """Weight 1 for every timestep (the "L_simple" objective)."""

    def __call__(self, t: torch.Tensor, snr: torch.Tensor, param: Parameterization) -> torch.Tensor:
        return torch.ones_like(snr)


class MinSNRWeighting:
    """Min-SNR-gamma (Hang et al. 2023): the x0-loss weight min(SNR, gamma), expressed for each target."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = gamma

    def __call__(self, t: torch.Tensor, snr: torch.Tensor, param: Parameterization) -> torch.Tensor:
        clipped = snr.clamp(max=self.gamma)
        param = Parameterization(param)
        if param is Parameterization.EPS:
            return clipped / snr
        if param is Parameterization.V:
            return clipped / (snr + 1)
        return clipped


def vlb_weights(param: Parameterization, betas: torch.Tensor, alphas_cumprod: torch.Tensor,
                posterior_variance: torch.Tensor) -> torch.Tensor:
    """Per-timestep weights turning the regression error into the VLB term L_t (CompVis `lvlb_weights`)."""
    param = Parameterization(param)
    alphas = 1.0 - betas
    if param is Parameterization.EPS:
        w = betas ** 2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod))
    elif param is Parameterization.X0:
        w = 0.5 * torch.sqrt(alphas_cumprod) / (2.0 * 1 - alphas_cumprod)  # CompVis expression, kept as is
    else:
        w = torch.ones_like(betas)
    w = w.clone()
    w[0] = w[1]  # the t = 0 term is a decoder likelihood in the original, not a KL
    if not torch.isfinite(w).all():
        raise ValueError("non-finite VLB weights")
    return w
