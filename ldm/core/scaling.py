"""One scaling object per parameterization: the preconditioning of Karras et al. 2022 (EDM, Table 1).

A network F that predicts eps, x0 or v becomes the denoiser

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

for x = x0 + sigma * eps (the variance-exploding view that samplers use). For a discrete VP model,
c_in * x = alpha * x0 + s * eps is the VP sample with alpha = 1 / sqrt(1 + sigma^2) and
s = sigma * alpha, so the same object also states the estimate in VP form,
x0 = skip * x_vp + out * F (method `vp`), and the regression target F* that makes D exact
(method `target`). Sampling (ldm.core.denoiser) and training
(ldm.modules.diffusionmodules.loss) both read these; nothing else writes the eps/x0/v algebra.
"""
from __future__ import annotations

from typing import Union

import torch

from ldm.core.parameterization import Parameterization


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, s) of the VP sample at VE level sigma: alpha = 1/sqrt(1+sigma^2), s = sigma * alpha (finite at inf)."""
    alpha = torch.rsqrt(1 + sigma * sigma)
    s = torch.rsqrt(1 + (sigma * sigma).reciprocal())  # = sigma / sqrt(1 + sigma^2), 1 at sigma = inf
    return alpha, s


class DenoiserScaling:
    """Base: (c_skip, c_out, c_in, c_noise) of sigma, derived from the VP-form coefficients `vp`."""

    parameterization: Parameterization

    def vp(self, alpha: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip, out) with x0 = skip * x_vp + out * F for x_vp = alpha * x0 + s * eps."""
        raise NotImplementedError

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha, s = vp_coefficients(sigma)
        skip, out = self.vp(alpha, s)
        return skip * alpha, out, alpha, sigma  # c_noise: the level itself; a discrete schedule maps it to t

    def target(self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The network output F* for which the estimate is exactly x0: (x0 - skip * x_vp) / out."""
        skip, out = self.vp(alpha, s)
        return (x0 - skip * (alpha * x0 + s * noise)) / out


class EpsScaling(DenoiserScaling):
    """eps-prediction (Ho et al. 2020): x0 = (x_vp - s * eps) / alpha, i.e. D = x - sigma * F."""

    parameterization = Parameterization.EPS

    def vp(self, alpha, s):
        return alpha.reciprocal(), -s / alpha

    def target(self, x0, noise, alpha, s):
        return noise  # the general formula, without its 0/0 at alpha = 0 (zero terminal SNR)


class X0Scaling(DenoiserScaling):
    """x0-prediction: D = F."""

    parameterization = Parameterization.X0

    def vp(self, alpha, s):
        return torch.zeros_like(alpha), torch.ones_like(alpha)


class VScaling(DenoiserScaling):
    """v-prediction (Salimans & Ho 2022): x0 = alpha * x_vp - s * v."""

    parameterization = Parameterization.V

    def vp(self, alpha, s):
        return alpha, -s

    def target(self, x0, noise, alpha, s):
        return alpha * noise - s * x0  # the general formula in closed form (no cancellation at small s)


SCALINGS: dict[Parameterization, type[DenoiserScaling]] = {
    Parameterization.EPS: EpsScaling, Parameterization.X0: X0Scaling, Parameterization.V: VScaling}


def scaling_for(parameterization: Union[Parameterization, str]) -> DenoiserScaling:
    """The scaling object of a parameterization name ('eps', 'x0', 'v')."""
    try:
        return SCALINGS[Parameterization(parameterization)]()
    except ValueError:
        raise ValueError(f"parameterization '{parameterization}' unknown: use one of "
                         f"{', '.join(p.value for p in Parameterization)}") from None
