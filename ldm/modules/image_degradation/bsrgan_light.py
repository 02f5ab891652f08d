"""The light BSR degradation (CompVis `degradation_fn_bsr_light`): one blur, milder noise and JPEG; see .bsrgan."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ldm.modules.image_degradation.bsrgan import BSR_LIGHT, degrade


def degradation_bsrgan_variant(image: np.ndarray, sf: int = 4, isp_model: Any = None,
                               rng: Optional[np.random.Generator] = None) -> dict[str, Any]:
    """{"image": the degraded uint8 image, "params": the drawn parameters}."""
    if isp_model is not None:
        raise NotImplementedError("a camera ISP model is not provided")
    out, params = degrade(image, sf, rng, BSR_LIGHT)
    return {"image": out, "params": params}
