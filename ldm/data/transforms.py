"""Image helpers shared by the datasets: resize/crop/flip to HWC float in [-1, 1]."""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from PIL import Image

Crop = Literal["center", "random", "none"]


def resize_crop(img: Image.Image, size: Optional[int], crop: Crop = "center", flip: bool = False,
                rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Resize the short side to `size`, crop a square (center/random) or squash ('none'); optional h-flip."""
    rng = rng or np.random.default_rng()
    img = img.convert("RGB")
    if size is not None:
        w, h = img.size
        if crop == "none":
            img = img.resize((size, size), Image.BICUBIC)
        else:
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            img = img.resize((nw, nh), Image.BICUBIC)
            if crop == "random":
                left, top = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
            elif crop == "center":
                left, top = (nw - size) // 2, (nh - size) // 2
            else:
                raise ValueError(f"crop must be 'center', 'random' or 'none', got '{crop}'")
            img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return to_model_range(arr)


def to_model_range(arr: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 HWC in [-1, 1]."""
    return (np.ascontiguousarray(arr).astype(np.float32) / 127.5 - 1.0)
