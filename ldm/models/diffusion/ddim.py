"""CompVis `DDIMSampler` compatibility shell over `ldm.sampling` (same `sample(...)` signature and return)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from ldm.sampling.denoiser import VPDenoiser
from ldm.sampling.guidance import CFGDenoiser, MaskedDenoiser, ThresholdedDenoiser
from ldm.sampling.samplers import sample_ddim
from ldm.sampling.spacing import Spacing, compvis_ddim_timesteps, get_sigmas, sigma_to_vp_scale

logger = logging.getLogger(__name__)


class _ApplyModelNet:
    """net(x_vp, t, c=...) -> model.apply_model(x_vp, t, c): what a CompVis LatentDiffusion exposes."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, c: Any = None) -> torch.Tensor:
        return self.model.apply_model(x, t.long(), c)


class CompVisSamplerBase:
    """Reads `alphas_cumprod`, `num_timesteps`, `parameterization` and `apply_model` from a CompVis model."""

    sampler_fn: Callable = staticmethod(sample_ddim)
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
        ac = self.model.alphas_cumprod.detach().double().cpu()
        self.ddim_alphas = ac[self.ddim_timesteps]
        self.ddim_alphas_prev = torch.cat([ac[:1], ac[self.ddim_timesteps[:-1]]])
        self.ddim_sigmas = ddim_eta * torch.sqrt((1 - self.ddim_alphas_prev) / (1 - self.ddim_alphas)
                                                 * (1 - self.ddim_alphas / self.ddim_alphas_prev))
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - self.ddim_alphas)
        self.ddim_eta = ddim_eta

    def _denoiser(self, conditioning, unconditional_guidance_scale: float, unconditional_conditioning,
                  mask, x0, dynamic_threshold):
        den = VPDenoiser(_ApplyModelNet(self.model), self.model.alphas_cumprod,
                         parameterization=getattr(self.model, "parameterization", "eps"), quantize=True)
        extra: dict = {"cond": {"c": conditioning}}
        model = CFGDenoiser(den, scale=unconditional_guidance_scale)
        if unconditional_conditioning is not None and unconditional_guidance_scale != 1.0:
            extra["uncond"] = {"c": unconditional_conditioning}
        if dynamic_threshold is not None:
            model = ThresholdedDenoiser(model, percentile=dynamic_threshold)
        if mask is not None:
            if x0 is None:
                raise ValueError("mask given without x0 (the known latents to keep where mask is 1)")
            model = MaskedDenoiser(model, mask, x0)
        return model, extra

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0: bool = False, eta: float = 0.0, mask=None, x0=None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
               verbose: bool = True, x_T=None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning=None, dynamic_threshold=None, ucg_schedule=None,
               generator: Optional[torch.Generator] = None, **kwargs):
        """CompVis signature; returns (samples, {"x_inter": [...], "pred_x0": [...]})."""
        unsupported = {"normals_sequence": normals_sequence is not None, "quantize_x0": quantize_x0,
                       "temperature": temperature != 1.0, "noise_dropout": noise_dropout != 0.0,
                       "score_corrector": score_corrector is not None, "ucg_schedule": ucg_schedule is not None}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"{type(self).__name__}.sample: options not provided: {', '.join(bad)}")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        device = next(iter(self.model.parameters())).device if self.device is None else self.device
        size = (batch_size, *shape)
        if x_T is None:
            x_T = torch.randn(size, generator=generator, device=device)
        sigmas = get_sigmas(self.model_schedule(), S, Spacing.UNIFORM).to(device)
        model, extra = self._denoiser(conditioning, unconditional_guidance_scale, unconditional_conditioning,
                                      mask, x0, dynamic_threshold)
        intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}

        def _cb(info: dict) -> None:
            i = info["i"]
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(info["denoised"], i)
            if i % log_every_t == 0 or i == S - 1:
                intermediates["x_inter"].append(info["x"] * sigma_to_vp_scale(info["sigma"]))
                intermediates["pred_x0"].append(info["denoised"])

        x = x_T / sigma_to_vp_scale(sigmas[0])  # VP noise -> VE at the first level
        kw = {"eta": eta, "generator": generator} if self.name == "ddim" else {}
        x = type(self).sampler_fn(model, x, sigmas, extra_args=extra, callback=_cb, disable=not verbose, **kw)
        return x * sigma_to_vp_scale(sigmas[-1]), intermediates

    def model_schedule(self):
        from ldm.sampling.denoiser import DiscreteSchedule
        return DiscreteSchedule(self.model.alphas_cumprod)

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
        sigmas = get_sigmas(self.model_schedule(), n, Spacing.UNIFORM).to(x_latent.device)
        sigmas = sigmas[n - t_start:]
        model, extra = self._denoiser(cond, unconditional_guidance_scale, unconditional_conditioning, None, None, None)
        x = x_latent / sigma_to_vp_scale(sigmas[0])
        x = sample_ddim(model, x, sigmas, extra_args=extra, disable=True)
        return x * sigma_to_vp_scale(sigmas[-1])


class DDIMSampler(CompVisSamplerBase):
    """DDIM (Song et al. 2021) with the CompVis interface."""

    sampler_fn = staticmethod(sample_ddim)
    name = "ddim"
