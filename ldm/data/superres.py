"""Super-resolution pairs with the CompVis parameter names: `image` (high resolution) and `LR_image` (degraded).

A crop of side `uniform(min_crop_f, max_crop_f) * min(H, W)` (random or centred), resized to `size` with
area averaging, then degraded by `downscale_f` with `degradation`: `bsrgan` or `bsrgan_light` (the BSR
pipeline, ldm.modules.image_degradation) or an interpolation name (`pil_bicubic`, `cv_area`, ...).
Deterministic per (seed, index); the drawn degradation parameters are in the item under `degradation`
(a JSON string, so batches collate).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.folder import IMAGE_EXTENSIONS, check_root, first_readable
from ldm.data.local import load_rgb
from ldm.data.transforms import to_model_range
from ldm.files import read_rgb8
from ldm.modules.image_degradation.bsrgan import BSR_FULL, BSR_LIGHT, DEGRADATIONS, degrade, interpolation_downscale

BSR_DEGRADATIONS = {"bsrgan": BSR_FULL, "bsrgan_light": BSR_LIGHT}


def check_degradation(name: str) -> str:
    if name not in BSR_DEGRADATIONS and name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation '{name}': use one of {sorted(BSR_DEGRADATIONS) + sorted(DEGRADATIONS)}")
    return name


def make_lr(hr: np.ndarray, downscale_f: int, degradation: str, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """(low-resolution uint8 image, drawn parameters) of a uint8 HWC image."""
    if degradation in BSR_DEGRADATIONS:
        return degrade(hr, downscale_f, rng, BSR_DEGRADATIONS[degradation])
    return interpolation_downscale(hr, downscale_f, degradation), [{"op": degradation, "factor": downscale_f}]


def sr_pair(photo: np.ndarray, size: int, downscale_f: int, degradation: str, min_crop_f: float, max_crop_f: float,
            random_crop: bool, rng: np.random.Generator) -> dict[str, Any]:
    """One (image, LR_image) pair from a uint8 HWC photo, as the CompVis ImageNetSR / OpenImages SR classes make it."""
    h, w = photo.shape[:2]
    side = max(1, int(min(h, w) * rng.uniform(min_crop_f, max_crop_f)))
    if random_crop:
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    else:
        top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    hr = np.asarray(crop.resize((size, size), Image.BOX if side >= size else Image.BICUBIC))
    lr, params = make_lr(hr, downscale_f, degradation, rng)
    return {"image": to_model_range(hr), "LR_image": to_model_range(lr), "degradation": json.dumps(params)}


class SRBase(Dataset):
    """Checks the CompVis SR parameters; subclasses provide `photo(i)` (uint8 HWC) and `__len__`."""

    def __init__(self, size: int, degradation: str = "bsrgan_light", downscale_f: int = 4, min_crop_f: float = 0.5,
                 max_crop_f: float = 1.0, random_crop: bool = True, seed: int = 0):
        if size % downscale_f:
            raise ValueError(f"size {size} is not a multiple of downscale_f {downscale_f}")
        if not 0 < min_crop_f <= max_crop_f <= 1:
            raise ValueError(f"need 0 < min_crop_f <= max_crop_f <= 1, got {min_crop_f}, {max_crop_f}")
        self.size, self.degradation, self.downscale_f = int(size), check_degradation(degradation), int(downscale_f)
        self.min_crop_f, self.max_crop_f, self.random_crop, self.seed = min_crop_f, max_crop_f, random_crop, seed

    def photo(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), int(i)])

    def __getitem__(self, i: int) -> dict:
        return sr_pair(self.photo(i), self.size, self.downscale_f, self.degradation, self.min_crop_f, self.max_crop_f,
                       self.random_crop, self.rng(i))


class SuperresFolder(SRBase):
    """SR pairs from any folder of images (searched recursively), or from a text file list of paths relative to it."""

    def __init__(self, root: Union[str, Path], size: int = 256, file_list: Optional[Union[str, Path]] = None,
                 **kwargs: Any):
        super().__init__(size, **kwargs)
        self.root = check_root(root, type(self).__name__)
        if file_list is not None:
            lines = Path(file_list).read_text().splitlines()
            self.files = [self.root / ln.strip() for ln in lines if ln.strip()]
        else:
            self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"{type(self).__name__}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def photo(self, i: int) -> np.ndarray:
        return load_rgb(self.files[i])

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        return first_readable(self.files, self.bad, i, lambda j: sr_pair(
            self.photo(j), self.size, self.downscale_f, self.degradation, self.min_crop_f, self.max_crop_f,
            self.random_crop, rng))


class SkimageSR(SRBase):
    """SR pairs from the photos bundled with scikit-image (train: all but coffee.png; validation: coffee.png)."""

    def __init__(self, split: str = "train", size: int = 32, num_samples: int = 10000,
                 photos: Optional[Sequence[str]] = None, **kwargs: Any):
        from ldm.data.bundled import SKIMAGE_PHOTOS, SKIMAGE_VAL_PHOTOS, skimage_data_dir

        super().__init__(size, **kwargs)
        if photos is None:
            photos = [p for p in SKIMAGE_PHOTOS if (p in SKIMAGE_VAL_PHOTOS) == (split != "train")]
        self.photos = []
        for name in photos:
            path = skimage_data_dir() / name
            if not path.is_file():
                raise FileNotFoundError(f"scikit-image photo not found: {path} (is scikit-image installed?)")
            self.photos.append(np.asarray(read_rgb8(path)))
        self.num_samples, self.split_code = int(num_samples), 0 if split == "train" else 1

    def __len__(self) -> int:
        return self.num_samples

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), self.split_code, int(i)])

    def photo(self, i: int) -> np.ndarray:
        return self.photos[int(self.rng(i).integers(len(self.photos)))]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        rng = self.rng(i)
        photo = self.photos[int(rng.integers(len(self.photos)))]
        item = sr_pair(photo, self.size, self.downscale_f, self.degradation, self.min_crop_f, self.max_crop_f,
                       self.random_crop, rng)
        if rng.random() < 0.5:  # horizontal flip of both
            item["image"], item["LR_image"] = item["image"][:, ::-1].copy(), item["LR_image"][:, ::-1].copy()
        return item
