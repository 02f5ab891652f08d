"""Samplers by name, each described (its options, whether it is stochastic, evaluations per step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ldm.errors import InputError
from ldm.sampling.samplers import (sample_consistency, sample_ddim, sample_ddpm, sample_dpm_solver_1, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                                   sample_euler, sample_euler_ancestral, sample_heun, sample_plms, sample_unipc)


@dataclass(frozen=True)
class SamplerInfo:
    """What callers need to know of a sampler, so that none inspects its signature."""
    fn: Callable
    options: tuple[str, ...] = ()  # its own keyword options beyond the shared contract
    stochastic: bool = False       # draws fresh noise at every step (ddim too when eta > 0)
    evals_per_step: int = 1        # model evaluations per step

    @property
    def takes_eta(self) -> bool:
        return "eta" in self.options


SAMPLER_INFO: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(sample_ddpm, stochastic=True),
    "ddim": SamplerInfo(sample_ddim, ("eta",)),
    "plms": SamplerInfo(sample_plms),
    "euler": SamplerInfo(sample_euler),
    "euler_ancestral": SamplerInfo(sample_euler_ancestral, ("eta", "s_noise"), stochastic=True),
    "heun": SamplerInfo(sample_heun, evals_per_step=2),  # twice except on a final step to sigma 0
    "dpm_solver_1": SamplerInfo(sample_dpm_solver_1),
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m),
    "dpmpp_2m_sde": SamplerInfo(sample_dpmpp_2m_sde, ("eta", "s_noise"), stochastic=True),
    "unipc": SamplerInfo(sample_unipc, ("order", "use_corrector", "lower_order_final")),
    "consistency": SamplerInfo(sample_consistency, stochastic=True),  # for consistency models (ldm.distillation)
}
SAMPLERS: dict[str, Callable] = {name: info.fn for name, info in SAMPLER_INFO.items()}
STOCHASTIC = tuple(name for name, info in SAMPLER_INFO.items() if info.stochastic)
EVALS_PER_STEP = {name: info.evals_per_step for name, info in SAMPLER_INFO.items()}


def sampler_info(name: str) -> SamplerInfo:
    """The registry's description of sampler `name` (error lists the known names)."""
    try:
        return SAMPLER_INFO[name]
    except KeyError:
        raise KeyError(f"unknown sampler '{name}'; known: {', '.join(sorted(SAMPLERS))}") from None


def eta_option(name: str, eta: float = 0.0) -> dict:
    """{"eta": eta} for a sampler that takes one, {} for eta 0 elsewhere; a non-zero eta it cannot take is an error."""
    if sampler_info(name).takes_eta:
        return {"eta": eta}
    if eta:
        raise InputError(f"eta {eta}: sampler '{name}' has no eta (samplers with one: "
                         f"{', '.join(n for n, i in SAMPLER_INFO.items() if i.takes_eta)})")
    return {}


def get_sampler(name: str) -> Callable:
    """Sampler function by registry name (error lists the known names)."""
    return sampler_info(name).fn
