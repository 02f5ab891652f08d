"""Noise schedules with the CompVis names, zero-terminal-SNR rescaling, and the derived DDPM buffers."""
from __future__ import annotations

import math
from enum import Enum
from typing import Sequence, Union

import numpy as np
import torch


class BetaSchedule(str, Enum):
    """CompVis schedule names. "linear" squares a linspace of square roots (diffusers: scaled_linear)."""
    LINEAR = "linear"
    COSINE = "cosine"
    SQRT_LINEAR = "sqrt_linear"
    SQRT = "sqrt"


COSINE_MAX_BETA = 0.999  # clip of the cosine schedule (Nichol & Dhariwal 2021)


def make_beta_schedule(schedule: Union[BetaSchedule, str], n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Betas in float64: linear = linspace(sqrt(start), sqrt(end))^2; sqrt_linear = linspace(start, end);
    sqrt = linspace(start, end)^0.5; cosine = Nichol & Dhariwal 2021, eq. 17."""
    schedule = BetaSchedule(schedule)
    if schedule is BetaSchedule.LINEAR:
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule is BetaSchedule.COSINE:
        ts = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(ts / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(min=0, max=COSINE_MAX_BETA)
    elif schedule is BetaSchedule.SQRT_LINEAR:
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    else:
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    return betas.numpy()


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def ddpm_buffers(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The CompVis DDPM schedule buffers (names are checkpoint keys), float32."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
    with np.errstate(divide="ignore"):
        out = {
            "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": post_var,
            # the variance is 0 at t = 0: clip the log to the next value (Ho et al. 2020)
            "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """a[t] reshaped to broadcast over a batch of shape `x_shape`."""
    out = a.to(t.device).gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))
