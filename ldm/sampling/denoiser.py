"""Discrete VP schedules as sigmas, and the denoiser that turns an eps/x0/v network into D(x, sigma).

Samplers work in the variance-exploding form x = x0 + sigma * eps (Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models"), where a VP model with cumulative alphas
a_t is seen through sigma_t = sqrt((1 - a_t) / a_t) and x_vp = x / sqrt(1 + sigma^2).
"""
from __future__ import annotations

from typing import Callable, Literal, Union

import torch
from torch import nn

from ldm.modules.diffusionmodules.parameterization import Parameterization


class DiscreteSchedule(nn.Module):
    """A VP schedule given by its cumulative alphas, with sigma <-> (fractional) timestep maps."""

    def __init__(self, alphas_cumprod: torch.Tensor, quantize: bool = False):
        super().__init__()
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        sigmas = ((1 - ac) / ac) ** 0.5
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)
        self.quantize = quantize

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Timestep of `sigma` by linear interpolation in log-sigma (rounded when `quantize`)."""
        log_sigma = sigma.to(self.log_sigmas.dtype).log()
        dists = log_sigma[..., None] - self.log_sigmas
        if self.quantize:
            return dists.abs().argmin(dim=-1).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=-1).argmax(dim=-1).clamp(max=self.log_sigmas.shape[0] - 2)
        low, high = self.log_sigmas[low_idx], self.log_sigmas[low_idx + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * (low_idx + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (fractional) timestep `t`, interpolating log-sigma."""
        t = t.float().to(self.log_sigmas.device)
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


class VPDenoiser(nn.Module):
    """D(x, sigma) for a discrete-time VP network `net(x_vp, t, **cond)` predicting eps, x0 or v."""

    def __init__(self, net: Callable[..., torch.Tensor], alphas_cumprod: torch.Tensor,
                 parameterization: Union[Parameterization, Literal["eps", "x0", "v"]] = "eps",
                 quantize: bool = False):
        super().__init__()
        self.net = net
        self.schedule = DiscreteSchedule(alphas_cumprod, quantize=quantize)
        self.parameterization = Parameterization(parameterization)

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.sigmas

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = _expand_sigma(sigma, x)
        s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        c_in = 1.0 / (s * s + 1.0).sqrt()
        t = self.schedule.sigma_to_t(sigma)
        out = self.net(x * c_in, t, **cond)
        if self.parameterization is Parameterization.EPS:
            return x - s * out
        if self.parameterization is Parameterization.X0:
            return out
        # v = sqrt(a) eps - sqrt(1 - a) x0  =>  x0 = c_in^2 x - sigma c_in v
        return c_in * c_in * x - s * c_in * out


def _expand_sigma(sigma: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.dim() == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (the eps estimate)."""
    return (x - denoised) / append_dims(sigma, x.dim())


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t.view(*t.shape, *([1] * (ndim - t.dim())))
