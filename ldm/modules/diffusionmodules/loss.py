"""The denoising loss as a callable given the network; timestep sampling and loss weighting are separate objects."""
from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Optional, Union

import torch

from ldm.modules.diffusionmodules.batch_random import GlobalBatchRandom
from ldm.core.denoiser import Denoiser, DiscreteSchedule, append_dims
from ldm.core.scaling import DenoiserScaling, vp_coefficients
from ldm.core.parameterization import Parameterization


class LossType(str, Enum):
    """Element-wise regression loss (CompVis `loss_type`)."""
    L2 = "l2"
    L1 = "l1"


def elementwise_loss(kind: Union[LossType, str], pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    kind = LossType(kind)
    return (pred - target).pow(2) if kind is LossType.L2 else (pred - target).abs()


class DrawDomain(str, Enum):
    """What a noise-level sampler draws: indices of the discrete schedule, or the levels sigma themselves."""
    TIMESTEP = "timestep"
    SIGMA = "sigma"


class UniformTimesteps:
    """t ~ U{0, ..., T-1} (Ho et al. 2020)."""

    draws = DrawDomain.TIMESTEP

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def __call__(self, n: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator).long()


class EDMLogNormalSigmas:
    """log sigma ~ N(p_mean, p_std^2) (Karras et al. 2022, EDM, Table 1 "Training"; SVD trains so)."""

    draws = DrawDomain.SIGMA

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def __call__(self, n: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return (self.p_mean + self.p_std * torch.randn((n,), device=device, generator=generator)).exp()


class LogitNormalTimesteps:
    """u = sigmoid(N(mean, std^2)) placed on the schedule as the fractional timestep u (T - 1) (the logit-normal
    density of Esser et al. 2024, Sec. 3.1, on a VP schedule); the sigma of that timestep by log-sigma interpolation."""

    draws = DrawDomain.SIGMA

    def __init__(self, num_timesteps: int, mean: float = 0.0, std: float = 1.0):
        self.num_timesteps, self.mean, self.std = int(num_timesteps), float(mean), float(std)
        self.schedule: Optional[DiscreteSchedule] = None  # the loss gives its own (bind)

    def bind(self, schedule: DiscreteSchedule) -> "LogitNormalTimesteps":
        self.schedule = schedule
        return self

    def __call__(self, n: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.schedule is None:
            raise RuntimeError("LogitNormalTimesteps: no schedule bound (DiffusionLoss binds the model's)")
        u = torch.sigmoid(self.mean + self.std * torch.randn((n,), device=device, generator=generator))
        return self.schedule.t_to_sigma(u * (self.num_timesteps - 1)).to(device)


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
    """Weighted denoising regression through the denoiser the samplers call (Ho et al. 2020's L_simple, Karras et
    al. 2022's training, with CompVis' VLB term and learned log-variance).

    Called with D(x, sigma) (ldm.core.denoiser.Denoiser), clean latents x0 and the conditioning,
    it draws noise levels (timesteps of the schedule, or sigmas) and noise, forms x = x0 + sigma * noise, denoises,
    and regresses the network's output F on the target F* of the model's scaling: F - F* = (D - x0) / c_out, so this
    is the denoising loss weighted by 1 / c_out^2 (EDM's lambda), which for eps / v / x0 is L_simple. The weighting
    object multiplies per item. Returns (loss, log dict with the CompVis keys).
    """

    def __init__(self, scaling: DenoiserScaling, timestep_sampler: Callable, weighting: Callable,
                 loss_type: Union[LossType, str] = LossType.L2, l_simple_weight: float = 1.0,
                 original_elbo_weight: float = 0.0, offset_noise: float = 0.0):
        self.scaling, self.timestep_sampler, self.weighting = scaling, timestep_sampler, weighting
        self.loss_type = LossType(loss_type)
        self.l_simple_weight, self.original_elbo_weight, self.offset_noise = l_simple_weight, original_elbo_weight, offset_noise

    @property
    def draws(self) -> DrawDomain:
        return DrawDomain(getattr(self.timestep_sampler, "draws", DrawDomain.TIMESTEP))

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

    def noise_levels(self, schedule: DiscreteSchedule, n: int, device: torch.device, t: Optional[torch.Tensor] = None,
                     rng: Optional[GlobalBatchRandom] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, the nearest timestep index) of each item: `t` when given, else drawn by the sampler."""
        if t is None:
            if hasattr(self.timestep_sampler, "bind"):
                self.timestep_sampler.bind(schedule)
            draw = (rng.timesteps(self.timestep_sampler, n) if rng is not None
                    else self.timestep_sampler(n, device))
            if self.draws is DrawDomain.SIGMA:
                sigma = draw.float()
                return sigma, schedule.sigma_to_t(sigma).round().long().clamp(0, schedule.num_timesteps - 1)
            t = draw
        t = t.long()
        return schedule.sigmas.to(t.device)[t], t

    def __call__(self, denoiser: Denoiser, x0: torch.Tensor, cond: Any, t: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, logvar: Optional[torch.Tensor] = None,
                 vlb_weights: Optional[torch.Tensor] = None, prefix: str = "train",
                 sample_weights: Optional[torch.Tensor] = None,
                 rng: Optional[GlobalBatchRandom] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`denoiser(x, sigma, c=cond)`; `t`: timesteps instead of drawn levels; `vlb_weights` when the VLB term is on;
        `sample_weights`: the items' weights, summing the weighted losses in place of their mean (DreamBooth's prior
        preservation); `rng`: draw the levels and the noise for the global batch
        (ldm.modules.diffusionmodules.batch_random)."""
        sigma, t = self.noise_levels(denoiser.schedule, x0.shape[0], x0.device, t, rng)
        noise = self.make_noise(x0, rng) if noise is None else noise
        s = append_dims(sigma, x0.dim())
        _, out = denoiser.denoise_with_output(x0 + s * noise, sigma, c=cond)
        alpha, s_vp = vp_coefficients(s)
        target = self.scaling.target(x0, noise, alpha, s_vp)
        loss_simple = elementwise_loss(self.loss_type, out, target).mean(dim=list(range(1, out.dim())))
        loss = self.weighting(t, sigma.reciprocal().square(), self.scaling.parameterization) * loss_simple  # SNR
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
