"""CompVis `PLMSSampler` compatibility shell over `ldm.sampling` (PLMS, Liu et al. 2022)."""
from __future__ import annotations

from ldm.models.diffusion.ddim import CompVisSamplerBase
from ldm.sampling.samplers import sample_plms


class PLMSSampler(CompVisSamplerBase):
    """PLMS with the CompVis interface; eta must be 0."""

    sampler_fn = staticmethod(sample_plms)
    name = "plms"

    def _check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
