"""D(x, sigma) of a discrete-time VP network, and the schedule's sigma <-> timestep maps.

Samplers work in the variance-exploding form x = x0 + sigma * eps (Karras et al. 2022). A VP model
with cumulative alphas a_t is seen through sigma_t = sqrt((1 - a_t) / a_t); the network receives
the fractional timestep of sigma by log-sigma interpolation (k-diffusion's `CompVisDenoiser` with
quantize=False), so off-grid levels (Karras spacing, Heun's second evaluation) reach it unrounded.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

from ldm.core.scaling import DenoiserScaling

# Smallest cumulative alpha used for sampling: a zero-terminal-SNR schedule (a_T = 0, sigma = inf) is
# sampled from a_T = 2^-24 instead (the smallest positive float16 subnormal; diffusers does the same).
TERMINAL_ALPHA_MIN = 2.0 ** -24
# Fractional timesteps this close to an integer are that integer: a sigma taken from the training grid
# reaches the network as exactly its timestep, whatever rounding it went through.
TIMESTEP_SNAP = 1e-3


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """View `t` with trailing singleton dimensions up to `ndim`."""
    t = torch.as_tensor(t)
    return t.view(*t.shape, *([1] * (ndim - t.dim())))


class DiscreteSchedule(nn.Module):
    """A VP schedule given by its cumulative alphas, with sigma <-> (fractional) timestep maps."""

    def __init__(self, alphas_cumprod: torch.Tensor, quantize: bool = False):
        super().__init__()
        ac = torch.as_tensor(alphas_cumprod).detach().to(torch.float64)
        # the cumulative alphas as given, in float64 (the CompVis DDIM / PLMS shells read them)
        self.register_buffer("alphas_cumprod", ac.clone(), persistent=False)
        ac = torch.where(ac > 0, ac, torch.full_like(ac, TERMINAL_ALPHA_MIN))  # zero terminal SNR: finite sigma
        sigmas = ((1 - ac) / ac).sqrt().float()
        self.register_buffer("sigmas", sigmas, persistent=False)
        # log-sigmas of the float32 grid, in float32: a grid sigma maps back to exactly its index
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.quantize = quantize

    def quantized(self) -> "DiscreteSchedule":
        """The same schedule (its buffers shared, not recomputed) sending integer timesteps, as CompVis samplers do."""
        if self.quantize:
            return self
        twin = DiscreteSchedule.__new__(DiscreteSchedule)
        nn.Module.__init__(twin)
        for name, buf in self.named_buffers(recurse=False):
            twin.register_buffer(name, buf, persistent=False)
        twin.quantize = True
        return twin

    def _apply(self, fn, recurse: bool = True):
        """Follows a module's device moves but keeps its dtypes: `.half()` on a model must not round the noise levels
        (a half-precision sigma misses its grid timestep)."""
        for name, buf in self.named_buffers(recurse=False):
            moved = fn(buf)
            self._buffers[name] = buf.to(moved.device)
        return self

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
        """Timestep of `sigma` by linear interpolation in log-sigma (nearest integer when `quantize`)."""
        log_sigma = torch.as_tensor(sigma, device=self.log_sigmas.device).to(self.log_sigmas.dtype).log()
        dists = log_sigma[..., None] - self.log_sigmas
        if self.quantize:
            return dists.abs().argmin(dim=-1).view(log_sigma.shape)  # integer timesteps, as CompVis samplers pass
        low_idx = dists.ge(0).cumsum(dim=-1).argmax(dim=-1).clamp(max=self.num_timesteps - 2)
        low, high = self.log_sigmas[low_idx], self.log_sigmas[low_idx + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = low_idx.float() + w
        nearest = t.round()
        return torch.where((t - nearest).abs() < TIMESTEP_SNAP, nearest, t).view(log_sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (fractional) timestep `t`, interpolating log-sigma."""
        t = torch.as_tensor(t, device=self.log_sigmas.device).float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()


class Denoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, t(sigma)) for a network `net(x_vp, t, **cond)` (EDM preconditioning)."""

    def __init__(self, net: Callable[..., torch.Tensor], scaling: DenoiserScaling, schedule: DiscreteSchedule):
        super().__init__()
        self.net, self.scaling, self.schedule = net, scaling, schedule

    @property
    def parameterization(self):
        return self.scaling.parameterization

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.sigmas

    def _sigma(self, sigma: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Per-sample noise levels, in float32 at least (a half-precision sigma would miss its grid timestep)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        return sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma

    def forward(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], **cond) -> torch.Tensor:
        return self.denoise_with_output(x, sigma, **cond)[0]

    def denoise_with_output(self, x: torch.Tensor, sigma: Union[float, torch.Tensor],
                            **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(D(x, sigma), the network output F it came from): training regresses F (ldm.modules.diffusionmodules.loss)."""
        c_skip, c_out, c_in, c_noise = self.scaling(self._sigma(sigma, x))
        t = self.schedule.sigma_to_t(c_noise)
        out = self.net(x * append_dims(c_in, x.dim()).to(x.dtype), t, **cond)
        return append_dims(c_skip, x.dim()) * x + append_dims(c_out, x.dim()) * out, out  # EDM eq. 7

    def _skip_out(self, x: torch.Tensor, sigma: Union[float, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        c_skip, c_out, _, _ = self.scaling(self._sigma(sigma, x))
        return append_dims(c_skip, x.dim()), append_dims(c_out, x.dim())

    def model_output(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], denoised: torch.Tensor) -> torch.Tensor:
        """The network output F (eps, x0 or v) that gives `denoised` at (x, sigma)."""
        c_skip, c_out = self._skip_out(x, sigma)
        return (denoised - c_skip * x) / c_out

    def from_model_output(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """D(x, sigma) for the network output `out`."""
        c_skip, c_out = self._skip_out(x, sigma)
        return c_skip * x + c_out * out
