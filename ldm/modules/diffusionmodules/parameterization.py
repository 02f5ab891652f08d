"""What the network predicts (eps, x0, v) and the conversions between predictions and targets."""
from __future__ import annotations

from enum import Enum

import torch


class Parameterization(str, Enum):
    """eps: the noise (Ho et al. 2020); x0: the clean sample; v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
    EPS = "eps"
    X0 = "x0"
    V = "v"


def training_target(param: Parameterization, x0: torch.Tensor, noise: torch.Tensor, sqrt_ac: torch.Tensor,
                    sqrt_1m_ac: torch.Tensor) -> torch.Tensor:
    """Regression target for x_t = sqrt(a) x0 + sqrt(1 - a) noise (coefficients broadcast over x0)."""
    param = Parameterization(param)
    if param is Parameterization.EPS:
        return noise
    if param is Parameterization.X0:
        return x0
    return sqrt_ac * noise - sqrt_1m_ac * x0


def predict_x0(param: Parameterization, x_t: torch.Tensor, out: torch.Tensor, sqrt_ac: torch.Tensor,
               sqrt_1m_ac: torch.Tensor) -> torch.Tensor:
    """x0 estimate from the network output at x_t."""
    param = Parameterization(param)
    if param is Parameterization.EPS:
        return (x_t - sqrt_1m_ac * out) / sqrt_ac
    if param is Parameterization.X0:
        return out
    return sqrt_ac * x_t - sqrt_1m_ac * out


def predict_eps(param: Parameterization, x_t: torch.Tensor, out: torch.Tensor, sqrt_ac: torch.Tensor,
                sqrt_1m_ac: torch.Tensor) -> torch.Tensor:
    """Noise estimate from the network output at x_t."""
    param = Parameterization(param)
    if param is Parameterization.EPS:
        return out
    if param is Parameterization.X0:
        return (x_t - sqrt_ac * out) / sqrt_1m_ac
    return sqrt_1m_ac * x_t + sqrt_ac * out
