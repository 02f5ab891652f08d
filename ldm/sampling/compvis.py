"""The CompVis model adapter: any object with `apply_model(x, t, c)`, `alphas_cumprod` and `parameterization`
(a LatentDiffusion or DDPM, ours or a user's) seen as a denoiser D(x, sigma) for ldm.sampling."""
from __future__ import annotations

from typing import Any

import torch

from ldm.core.denoiser import Denoiser, DiscreteSchedule
from ldm.core.scaling import scaling_for


class ApplyModelNetwork:
    """net(x_vp, t, c=...) -> model.apply_model(x_vp, t, c), t fractional (or integer when quantized); with `net`, one
    of the model's other UNet wrappers through the same routing (`model.apply_network`: a distillation teacher)."""

    def __init__(self, model: Any, net: Any = None):
        self.model, self.net = model, net

    def __call__(self, x: torch.Tensor, t: torch.Tensor, c: Any = None, guidance: Any = None) -> torch.Tensor:
        if self.net is not None:
            return self.model.apply_network(self.net, x, t, c, guidance)
        if guidance is None:  # a user's CompVis model need not know the keyword
            return self.model.apply_model(x, t, c)
        return self.model.apply_model(x, t, c, guidance=guidance)


class CompVisDenoiser(Denoiser):
    """D(x, sigma) of a CompVis-style model; `quantize=True` sends the nearest integer timestep instead."""

    def __init__(self, model: Any, quantize: bool = False):
        super().__init__(ApplyModelNetwork(model), scaling_for(getattr(model, "parameterization", "eps")),
                         model_schedule(model, quantize))


def model_schedule(model: Any, quantize: bool = False) -> DiscreteSchedule:
    """The model's one schedule object (`noise_schedule`, built once with it), or one built from a user's CompVis
    model's `alphas_cumprod`; the integer-timestep view when `quantize`."""
    schedule = getattr(model, "noise_schedule", None)
    if not isinstance(schedule, DiscreteSchedule):
        schedule = DiscreteSchedule(model.alphas_cumprod)
    return schedule.quantized() if quantize else schedule
