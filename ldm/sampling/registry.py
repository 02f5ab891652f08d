"""Samplers by name."""
from __future__ import annotations

from typing import Callable

from ldm.sampling.samplers import (sample_ddim, sample_ddpm, sample_dpm_solver_1, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                                   sample_euler, sample_euler_ancestral, sample_heun, sample_plms, sample_unipc)

SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_solver_1": sample_dpm_solver_1,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
}
# samplers that draw fresh noise at every step (ddim too when eta > 0)
STOCHASTIC = ("ddpm", "euler_ancestral", "dpmpp_2m_sde")
# model evaluations per step (Heun evaluates twice except on a final step to sigma 0)
EVALS_PER_STEP = {name: 1 for name in SAMPLERS} | {"heun": 2}


def get_sampler(name: str) -> Callable:
    """Sampler function by registry name (error lists the known names)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise KeyError(f"unknown sampler '{name}'; known: {', '.join(sorted(SAMPLERS))}") from None
