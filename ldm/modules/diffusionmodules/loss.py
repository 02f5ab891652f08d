"""The denoising loss as a callable given the network; timestep sampling and loss weighting are separate objects."""
from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Optional, Union

import torch

from ldm.modules.diffusionmodules.batch_random import GlobalBatchRandom
from ldm.modules.diffusionmodules.denoiser_scaling import DenoiserScaling
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
        param = Parameterization(param)
        if param is Parameterization.EPS:
            return (self.gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, also at SNR = 0
        clipped = snr.clamp(max=self.gamma)
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
        bad = torch.nonzero(~torch.isfinite(w)).flatten().tolist()
        raise ValueError(f"original_elbo_weight > 0 needs the VLB weights, which are not finite at timesteps {bad[:5]} "
                         f"for parameterization '{param.value}' (a zero-terminal-SNR schedule has alpha = 0 there): "
                         f"set original_elbo_weight: 0 or use another schedule")
    return w


class DiffusionLoss:
    """Weighted denoising regression (Ho et al. 2020's L_simple, with CompVis' VLB term and learned log-variance).

    Called with the network `net(x_t, t, cond)`, clean latents x0 and the conditioning, it draws t and
    noise, forms x_t = alpha_t x0 + sigma_t noise, and regresses the network output on the target of
    the model's scaling (ldm.modules.diffusionmodules.denoiser_scaling), the object D(x, sigma) uses.
    Returns (loss, log dict with the CompVis keys).
    """

    def __init__(self, scaling: DenoiserScaling, timestep_sampler: Callable, weighting: Callable,
                 loss_type: Union[LossType, str] = LossType.L2, l_simple_weight: float = 1.0,
                 original_elbo_weight: float = 0.0, offset_noise: float = 0.0):
        self.scaling, self.timestep_sampler, self.weighting = scaling, timestep_sampler, weighting
        self.loss_type = LossType(loss_type)
        self.l_simple_weight, self.original_elbo_weight, self.offset_noise = l_simple_weight, original_elbo_weight, offset_noise

    def make_noise(self, x: torch.Tensor, rng: Optional[GlobalBatchRandom] = None) -> torch.Tensor:
        """Gaussian noise, plus per-channel offset noise (Guttenberg 2023) when `offset_noise` > 0; drawn from `rng`
        (the global batch's draws) when given."""
        offset_shape = (x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
        if rng is not None:
            noise = rng.randn(x.shape, dtype=x.dtype)
            return noise + self.offset_noise * rng.randn(offset_shape, dtype=x.dtype) if self.offset_noise > 0 else noise
        noise = torch.randn_like(x)
        if self.offset_noise > 0:
            noise = noise + self.offset_noise * torch.randn(offset_shape, device=x.device, dtype=x.dtype)
        return noise

    def __call__(self, net: Callable[..., torch.Tensor], x0: torch.Tensor, cond: Any, alphas: torch.Tensor,
                 sigmas: torch.Tensor, t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                 logvar: Optional[torch.Tensor] = None, vlb_weights: Optional[torch.Tensor] = None,
                 prefix: str = "train", sample_weights: Optional[torch.Tensor] = None,
                 rng: Optional[GlobalBatchRandom] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`alphas`, `sigmas`: the schedule's sqrt(a_t) and sqrt(1 - a_t) tables; `vlb_weights` when the VLB term is on;
        `sample_weights`: the items' weights, summing the weighted losses in place of their mean (DreamBooth's
        prior preservation); `rng`: draw t and the noise for the global batch (ldm.modules.diffusionmodules.batch_random)."""
        if t is None:
            t = (rng.timesteps(self.timestep_sampler, x0.shape[0]) if rng is not None
                 else self.timestep_sampler(x0.shape[0], x0.device))
        noise = self.make_noise(x0, rng) if noise is None else noise
        shape = (-1,) + (1,) * (x0.dim() - 1)
        alpha, sigma = alphas[t].view(shape), sigmas[t].view(shape)
        out = net(alpha * x0 + sigma * noise, t, cond)
        target = self.scaling.target(x0, noise, alpha, sigma)
        loss_simple = elementwise_loss(self.loss_type, out, target).mean(dim=list(range(1, out.dim())))
        snr = (alphas[t] / sigmas[t]) ** 2
        loss = self.weighting(t, snr, self.scaling.parameterization) * loss_simple
        if logvar is not None:
            logvar_t = logvar[t]
            loss = loss / torch.exp(logvar_t) + logvar_t
        total = self.l_simple_weight * (loss.mean() if sample_weights is None else (sample_weights * loss).sum())
        log = {f"{prefix}/loss_simple": loss_simple.mean()}
        if self.original_elbo_weight:
            loss_vlb = (vlb_weights[t] * loss_simple).mean()
            total = total + self.original_elbo_weight * loss_vlb
            log[f"{prefix}/loss_vlb"] = loss_vlb
        log[f"{prefix}/loss"] = total
        if logvar is not None and logvar.requires_grad:
            log[f"{prefix}/loss_gamma"] = loss.mean()
            log["logvar"] = logvar.detach().mean()
        return total, log
