"""CompVis `PLMSSampler` compatibility shell over `ldm.sampling` (PLMS, Liu et al. 2022)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ldm.models.diffusion.ddim import CompVisSamplerBase
from ldm.core.algebra import to_d
from ldm.sampling.samplers import Generator, plms_step


class PLMSSampler(CompVisSamplerBase):
    """PLMS with the CompVis interface; eta must be 0."""

    name = "plms"

    def _check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")

    def _step(self, model: Callable, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              denoised: torch.Tensor, extra: dict, state: dict, eta: float, generator: Generator,
              x0_fn: Optional[Callable]) -> torch.Tensor:
        return plms_step(model, x, sigma, sigma_next, to_d(x, sigma, denoised), state.setdefault("old_eps", []),
                         extra, x0_fn=x0_fn)
