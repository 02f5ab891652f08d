"""Inpainting data: any dataset with masks added (image, mask, masked_image), and the shapes inpainting task.

The mask conventions (`sd`, `compvis`) and `masked_inputs` are the models' inputs, defined in
ldm.modules.model_inputs.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import numpy as np
from torch.utils.data import Dataset

from ldm.data.masks import MaskGenerator, object_box_mask
from ldm.data.shapes import JITTER, POSITIONS, SIZES, ShapesDataset
from ldm.modules.model_inputs import MaskConvention, masked_inputs
from ldm.util import instantiate_from_config

def _mask_generator(masks: Union[None, Mapping, MaskGenerator], seed: int) -> MaskGenerator:
    if isinstance(masks, MaskGenerator):
        return masks
    if masks is None:
        return MaskGenerator(seed=seed)
    if "target" in masks:
        return instantiate_from_config(masks, key="masks")
    return MaskGenerator(**{"seed": seed, **dict(masks)})


class InpaintingDataset(Dataset):
    """Items of `dataset` plus `mask` (H, W, 1) and `masked_image` (H, W, C), deterministic per (seed, index).

    `masks`: a MaskGenerator, its parameters (`mix`, `p_full`, `seed`) or a target/params config.
    """

    def __init__(self, dataset: Any, masks: Union[None, Mapping, MaskGenerator] = None, image_key: str = "image",
                 convention: Union[MaskConvention, str] = MaskConvention.SD, seed: int = 0):
        self.dataset = instantiate_from_config(dataset, key="InpaintingDataset.dataset") if isinstance(
            dataset, Mapping) else dataset
        self.masks, self.image_key = _mask_generator(masks, seed), image_key
        self.convention = MaskConvention(convention)

    def __len__(self) -> int:
        return len(self.dataset)

    def mask(self, index: int, h: int, w: int) -> np.ndarray:
        return self.masks(index, h, w)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        if self.image_key not in item:
            raise KeyError(f"InpaintingDataset: item {index} has no key '{self.image_key}' (image_key); "
                           f"keys: {sorted(item)}")
        image = np.asarray(item[self.image_key], dtype=np.float32)
        m = self.mask(index, image.shape[0], image.shape[1])[..., None]
        item["mask"], item["masked_image"] = (a.astype(np.float32) for a in masked_inputs(image, m, self.convention))
        return item


def shapes_object_box(position: str, side: int, margin_px: float = 1.0) -> np.ndarray:
    """The box mask that erases any object at `position` (either size, any jitter), from the position name alone."""
    fx, fy = POSITIONS[position]
    half = (max(SIZES.values()) + JITTER) * side
    return object_box_mask(side, side, fx * side, fy * side, half, margin=margin_px)


class ShapesInpainting(InpaintingDataset):
    """The shapes task for text-conditioned inpainting: with probability `p_object` the mask is the box over the
    object's position (the caption is then the only clue to what was there), else one from `masks`."""

    def __init__(self, size: int = 32, split: str = "train", num_samples: Optional[int] = None, seed: int = 0,
                 p_object: float = 0.5, masks: Union[None, Mapping, MaskGenerator] = None,
                 convention: Union[MaskConvention, str] = MaskConvention.SD):
        if not 0.0 <= p_object <= 1.0:
            raise ValueError(f"ShapesInpainting: p_object must lie in [0, 1], got {p_object}")
        super().__init__(ShapesDataset(size=size, split=split, num_samples=num_samples, seed=seed), masks,
                         convention=convention, seed=seed)
        self.p_object, self.side = float(p_object), int(size)

    def mask(self, index: int, h: int, w: int) -> np.ndarray:
        if self.masks.rng(index).uniform() < self.p_object:
            return shapes_object_box(self.dataset.spec(index).position, self.side)
        return self.masks(index + len(self), h, w)  # a stream apart from the object-box draw
