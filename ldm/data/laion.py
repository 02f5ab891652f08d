"""Stable Diffusion 2 `ldm.data.laion` names: `WebDataModuleFromConfig` (WebDataset shards, ldm.data.webdata) and
`AddMask`, the inpainting transform of a sample pipeline."""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Optional

import numpy as np
import torch

from ldm.data.masks import MaskGenerator
from ldm.data.webdata import WebDataModuleFromConfig  # noqa: F401  (SD2 import path)
from ldm.modules.model_inputs import MaskConvention, masked_inputs

# SD2's mode names mapped onto our presets (sizes are scaled to the image side by the generator)
MASK_MODES: dict[str, dict[str, float]] = {
    "256narrow": {"thin": 1.0},
    "256train": {"thin": 1.0, "medium": 1.0, "thick": 1.0},
    "512train": {"thin": 1.0, "medium": 1.0, "thick": 1.0},
    "512train-large": {"medium": 1.0, "thick": 2.0},
    "thin": {"thin": 1.0}, "medium": {"medium": 1.0}, "thick": {"thick": 1.0}, "box": {"box": 1.0},
}


class AddMask:
    """Adds `mask` (H, W, 1, 1 = fill) and `masked_image` (hole set to 0) to a sample whose `image_key` is HWC in [-1, 1].

    `mode`: a mask mode (MASK_MODES); `p_drop`: probability that the whole image is masked. Deterministic
    per seed and the sample's `__key__` (WebDataset), or per seed and call count when it has none.
    """

    def __init__(self, mode: str = "512train", p_drop: float = 0.0, image_key: str = "jpg", seed: int = 0):
        if mode not in MASK_MODES:
            raise ValueError(f"AddMask: unknown mode '{mode}'; use one of {sorted(MASK_MODES)}")
        self.masks = MaskGenerator(mix=MASK_MODES[mode], p_full=p_drop, seed=seed)
        self.image_key, self.mode, self.p_drop = image_key, mode, p_drop
        self._count = itertools.count()

    def _index(self, sample: dict) -> int:
        key: Optional[Any] = sample.get("__key__")
        if key is None:
            return next(self._count)
        return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little")

    def __call__(self, sample: dict) -> dict:
        if self.image_key not in sample:
            raise KeyError(f"AddMask: sample has no key '{self.image_key}' (image_key); keys: {sorted(sample)}")
        x = sample[self.image_key]
        m = self.masks(self._index(sample), int(x.shape[0]), int(x.shape[1]))[..., None]
        if isinstance(x, torch.Tensor):
            m = torch.from_numpy(m).to(x.dtype)
        else:
            x = np.asarray(x, dtype=np.float32)
        mask, masked = masked_inputs(x, m, MaskConvention.SD)
        sample["mask"], sample["masked_image"] = mask, masked
        return sample
