"""CompVis `DDIMSampler` compatibility shell over `ldm.sampling` (same `sample(...)` signature and return).

The loop is CompVis' own: integer timesteps of the uniform DDIM spacing, [unconditional, conditional]
guidance batches, and with `mask`/`x0` the known latents re-noised to each step's level
(`q_sample(x0, t)`) and blended into x_t before the step; `dynamic_threshold` is Stable Diffusion 2's
norm thresholding of the x0 estimate, with the step's direction still taken from the model's eps.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ldm import generation
from ldm.sampling.compvis import CompVisDenoiser, model_schedule
from ldm.sampling.entry import vp_scale
from ldm.sampling.guidance import Conditioning, ThresholdMode, threshold_x0
from ldm.sampling.inpainting import known_region_blend
from ldm.core.algebra import to_d
from ldm.sampling.samplers import Generator, ddim_step, randn_like
from ldm.core.spacing import Spacing, compvis_ddim_timesteps, get_sigmas

logger = logging.getLogger(__name__)


class CompVisSamplerBase:
    """Reads `alphas_cumprod`, `num_timesteps`, `parameterization` and `apply_model` from a CompVis model."""

    name = "ddim"

    def __init__(self, model, schedule: str = "linear", device: Optional[torch.device] = None, **kwargs):
        self.model = model
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule = schedule
        self.device = device

    def _check_eta(self, eta: float) -> None:
        pass

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """CompVis DDIM schedule: timesteps, alphas, previous alphas and eta-sigmas (as attributes)."""
        if ddim_discretize != "uniform":
            raise NotImplementedError(f"ddim_discretize '{ddim_discretize}': only 'uniform' (CompVis default) is provided")
        self._check_eta(ddim_eta)
        self.ddim_timesteps = compvis_ddim_timesteps(self.ddpm_num_timesteps, ddim_num_steps)
        ac = model_schedule(self.model).alphas_cumprod.detach().double().cpu()
        self.ddim_alphas = ac[self.ddim_timesteps]
        self.ddim_alphas_prev = torch.cat([ac[:1], ac[self.ddim_timesteps[:-1]]])
        self.ddim_sigmas = ddim_eta * torch.sqrt((1 - self.ddim_alphas_prev) / (1 - self.ddim_alphas)
                                                 * (1 - self.ddim_alphas / self.ddim_alphas_prev))
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - self.ddim_alphas)
        self.ddim_eta = ddim_eta

    def _denoiser(self, conditioning, unconditional_guidance_scale: float, unconditional_conditioning, n: int,
                  device: torch.device):
        den = CompVisDenoiser(self.model, quantize=True)  # CompVis samplers pass integer timesteps
        guided, extra = generation.guidance_setup(self.model, den, Conditioning(conditioning, unconditional_conditioning),
                                                  unconditional_guidance_scale, n, device)
        return den, guided, extra

    def _step(self, model: Callable, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              denoised: torch.Tensor, extra: dict, state: dict, eta: float, generator: Generator,
              x0_fn: Optional[Callable]) -> torch.Tensor:
        """DDIM step; the x0 estimate passes `x0_fn` (thresholding), the direction keeps the model's eps."""
        eps = to_d(x, sigma, denoised)
        return ddim_step(x, sigma, sigma_next, denoised if x0_fn is None else x0_fn(denoised), eps=eps, eta=eta,
                         generator=generator)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0: bool = False, eta: float = 0.0, mask=None, x0=None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
               verbose: bool = True, x_T=None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning=None, dynamic_threshold=None, ucg_schedule=None,
               generator: Generator = None, **kwargs):
        """CompVis signature; returns (samples, {"x_inter": [...], "pred_x0": [...]}).

        `mask` is 1 where `x0` (latents) is kept; `dynamic_threshold` a float (SD2's norm threshold).
        """
        unsupported = {"normals_sequence": normals_sequence is not None, "quantize_x0": quantize_x0,
                       "temperature": temperature != 1.0, "noise_dropout": noise_dropout != 0.0,
                       "score_corrector": score_corrector is not None, "ucg_schedule": ucg_schedule is not None}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"{type(self).__name__}.sample: options not provided: {', '.join(bad)}")
        if mask is not None and x0 is None:
            raise ValueError("mask given without x0 (the known latents to keep where mask is 1)")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        device = next(iter(self.model.parameters())).device if self.device is None else self.device
        if x_T is None:
            x_T = randn_like(torch.empty((batch_size, *shape), device=device), generator)
        den, model, extra = self._denoiser(conditioning, unconditional_guidance_scale, unconditional_conditioning,
                                           x_T.shape[0], device)
        sigmas = get_sigmas(den.schedule, S, Spacing.UNIFORM).to(device)
        x0_fn = None
        if dynamic_threshold is not None:
            def x0_fn(d: torch.Tensor) -> torch.Tensor:
                return threshold_x0(d, ThresholdMode.NORM, max_value=float(dynamic_threshold))
        intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}
        x = x_T / vp_scale(sigmas[0])  # VP noise -> VE at the first level
        state: dict = {}
        n = len(sigmas) - 1
        for i in range(n):
            if mask is not None:  # CompVis inpainting: known latents re-noised to this level, blended into x_t
                x = known_region_blend(x, sigmas[i], mask, x0, generator)
            denoised = model(x, sigmas[i].expand(x.shape[0]), **extra)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(denoised, i)
            x = self._step(model, x, sigmas[i], sigmas[i + 1], denoised, extra, state, eta, generator, x0_fn)
            if i % log_every_t == 0 or i == n - 1:
                intermediates["x_inter"].append(x * vp_scale(sigmas[i + 1]))
                intermediates["pred_x0"].append(denoised)
        return x * vp_scale(sigmas[-1]), intermediates

    # -- img2img helpers (CompVis names) ------------------------------------------------------
    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q(x_t | x0) at DDIM step index `t` (or training timestep with use_original_steps)."""
        ac = self.model.alphas_cumprod.detach().cpu().double()
        a = ac if use_original_steps else self.ddim_alphas
        a_t = a[t.cpu().long()].to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        noise = torch.randn_like(x0) if noise is None else noise
        return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning=None, use_original_steps: bool = False, callback=None) -> torch.Tensor:
        """Denoise from DDIM step index `t_start` (after stochastic_encode) to the end."""
        if use_original_steps:
            raise NotImplementedError("decode(use_original_steps=True) is not provided")
        n = len(self.ddim_timesteps)
        den = CompVisDenoiser(self.model, quantize=True)
        sigmas = get_sigmas(den.schedule, n, Spacing.UNIFORM)[n - t_start:]
        return generation.generate(self.model, Conditioning(cond, unconditional_conditioning), sigmas=sigmas,
                                   x_T=x_latent, sampler=self.name, scale=unconditional_guidance_scale,
                                   quantize=True, threshold=False, decode=False,
                                   callback=None if callback is None else (lambda info: callback(info["i"])))


class DDIMSampler(CompVisSamplerBase):
    """DDIM (Song et al. 2021) with the CompVis interface."""

    name = "ddim"
