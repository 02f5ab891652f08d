"""Image degradations for super-resolution training, with the CompVis names (`degradation_fn_bsr`,
`degradation_fn_bsr_light`) and the interpolation names the CompVis SR datasets accept."""
from ldm.modules.image_degradation.bsrgan import (BSR_FULL, BSR_LIGHT, DEGRADATIONS, BSRSettings, degrade,
                                                  degradation_bsrgan_variant, interpolation_downscale)
from ldm.modules.image_degradation.bsrgan_light import degradation_bsrgan_variant as degradation_fn_bsr_light

degradation_fn_bsr = degradation_bsrgan_variant

__all__ = ["degradation_fn_bsr", "degradation_fn_bsr_light", "degrade", "interpolation_downscale", "DEGRADATIONS",
           "BSRSettings", "BSR_FULL", "BSR_LIGHT"]
