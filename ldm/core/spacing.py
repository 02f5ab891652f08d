"""Noise-level (sigma) sequences for sampling: CompVis uniform, leading, trailing, linspace, Karras."""
from __future__ import annotations

from enum import Enum
from typing import Union

import numpy as np
import torch

from ldm.core.denoiser import DiscreteSchedule


class Spacing(str, Enum):
    """How S sampling steps are placed on the T training timesteps."""
    UNIFORM = "uniform"      # CompVis DDIM: range(0, T, T // S) + 1, last step to t = 0
    LEADING = "leading"      # arange(S) * (T // S), to sigma 0
    TRAILING = "trailing"    # round(arange(T, 0, -T / S)) - 1, to sigma 0 (Lin et al. 2023)
    LINSPACE = "linspace"    # linspace(0, T - 1, S) rounded, to sigma 0
    KARRAS = "karras"        # Karras et al. 2022 eq. 5 with rho = 7, to sigma 0


KARRAS_RHO = 7.0


def compvis_ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """CompVis `make_ddim_timesteps(..., 'uniform')`: range(0, T, T // S) + 1 (ascending).

    As in CompVis the count is ceil(T / (T // S)), which can exceed S (S = 300 of T = 1000 gives 334).
    With more than T / 2 steps the last timestep would be T, past the schedule: that is refused.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be at least 1, got {steps}")
    c = num_timesteps // steps
    if c < 2:
        raise ValueError(f"{steps} steps: 'uniform' (CompVis DDIM) spacing allows at most {num_timesteps // 2} of "
                         f"{num_timesteps} training timesteps (it would reach timestep {num_timesteps}); "
                         f"use 'trailing', 'leading' or 'linspace' spacing for more")
    # T mod (T // S) == 1 (e.g. S = 3 of 1000) ends at timestep T, past the schedule (an IndexError in CompVis): T - 1
    return np.minimum(np.asarray(list(range(0, num_timesteps, c))) + 1, num_timesteps - 1)


def timesteps_for(spacing: Spacing, num_timesteps: int, steps: int) -> np.ndarray:
    """Ascending integer timesteps of a discrete spacing."""
    if spacing is Spacing.UNIFORM:
        return compvis_ddim_timesteps(num_timesteps, steps)
    if spacing is Spacing.LEADING:
        return np.arange(steps) * (num_timesteps // steps)
    if spacing is Spacing.TRAILING:
        return np.sort(np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1)
    if spacing is Spacing.LINSPACE:
        return np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    raise ValueError(f"{spacing} has no integer timesteps")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def get_sigmas(schedule: DiscreteSchedule, steps: int, spacing: Union[Spacing, str] = Spacing.UNIFORM) -> torch.Tensor:
    """Descending sigmas for `steps` model evaluations of a discrete schedule, with the final target level."""
    spacing = Spacing(spacing)
    sig = schedule.sigmas.double()
    if spacing is Spacing.KARRAS:
        s = karras_sigmas(steps, float(sig[0]), float(sig[-1]))
        return torch.cat([s, s.new_zeros(1)]).float()
    ts = timesteps_for(spacing, schedule.num_timesteps, steps)
    s = sig[torch.as_tensor(ts[::-1].copy())]
    # CompVis DDIM ends at t = 0 ("previous alpha" of the first step is alphas_cumprod[0]); the others at 0.
    last = sig[:1] if spacing is Spacing.UNIFORM else s.new_zeros(1)
    out = torch.cat([s, last]).float()
    check_sigmas(out, f"{steps} steps with '{spacing.value}' spacing on {schedule.num_timesteps} timesteps")
    return out


def check_sigmas(sigmas: torch.Tensor, what: str = "sigmas") -> None:
    """Refuse a noise-level sequence with a zero-length or upward step (multistep samplers divide by the step)."""
    s = torch.as_tensor(sigmas)
    if s.dim() != 1 or s.shape[0] < 2:
        raise ValueError(f"{what}: need a 1-D sequence of at least two noise levels, got shape {tuple(s.shape)}")
    steps = s[1:] - s[:-1]
    bad = torch.nonzero(steps >= 0).flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(f"{what}: noise levels must strictly decrease; level {i + 1} ({float(s[i + 1]):.6g}) does not "
                         f"go below level {i} ({float(s[i]):.6g}) ({len(bad)} such steps). Use fewer steps or "
                         f"another spacing")
