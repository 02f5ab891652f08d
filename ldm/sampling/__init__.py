"""One sampler library: samplers with one contract, spacings, guidance wrappers, a registry by name, and
`sample`, the entry point that runs any of them on a denoiser from VP latents."""
from __future__ import annotations

from ldm.core.denoiser import Denoiser, DiscreteSchedule
from ldm.core.scaling import EpsScaling, VScaling, X0Scaling, scaling_for
from ldm.core.parameterization import Parameterization
from ldm.sampling.compvis import ApplyModelNetwork, CompVisDenoiser
from ldm.sampling.entry import sample, vp_scale
from ldm.sampling.guidance import (CFGDenoiser, Conditioning, MaskedDenoiser, ThresholdedDenoiser, ThresholdMode,
                                   img2img_start)
from ldm.sampling.inpainting import KnownRegionDenoiser, inpaint_sample, renoise, repaint_schedule
from ldm.sampling.registry import EVALS_PER_STEP, SAMPLERS, STOCHASTIC, get_sampler
from ldm.sampling.samplers import (randn_like, sample_consistency, sample_ddim, sample_ddpm, sample_dpm_solver_1, sample_dpmpp_2m,
                                   sample_dpmpp_2m_sde, sample_euler, sample_euler_ancestral, sample_heun, sample_plms,
                                   sample_unipc)
from ldm.core.spacing import Spacing, check_sigmas, get_sigmas, karras_sigmas

__all__ = ["sample", "vp_scale", "randn_like", "SAMPLERS", "STOCHASTIC", "EVALS_PER_STEP", "get_sampler",
           "Denoiser", "DiscreteSchedule", "CompVisDenoiser", "ApplyModelNetwork", "Parameterization", "EpsScaling",
           "X0Scaling", "VScaling", "scaling_for", "CFGDenoiser", "Conditioning", "MaskedDenoiser", "ThresholdedDenoiser",
           "ThresholdMode", "img2img_start", "KnownRegionDenoiser", "inpaint_sample", "renoise", "repaint_schedule", "Spacing", "check_sigmas", "get_sigmas", "karras_sigmas",
           ] + [f.__name__ for f in SAMPLERS.values()]
