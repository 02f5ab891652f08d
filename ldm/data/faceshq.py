"""FFHQ and CelebA-HQ from local copies, with the class names of CompVis / taming (`ldm.data.faceshq.*`, and
`taming.data.faceshq.*` when the taming package is not installed).

FFHQ: images under data/ffhq listed in data/ffhqtrain.txt / data/ffhqvalidation.txt. CelebA-HQ: images or
taming's `.npy` arrays (HWC uint8) under data/celebahq listed in data/celebahqtrain.txt /
data/celebahqvalidation.txt. `data_root` and `file_list` override them ($LDM_FACES_ROOT replaces data/).
Images are resized (short side) to `size` and centre-cropped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ldm.data.local import FileListDataset, dataset_root, read_file_list
from ldm.data.transforms import resize_crop
from ldm.files import read_rgb8

ENV = "LDM_FACES_ROOT"


class FacesBase(FileListDataset):
    """Listed face images: `image` (HWC in [-1, 1]) and `file_path_`; `keys` keeps only those entries."""

    FOLDER, LIST = "ffhq", "ffhqtrain.txt"

    def __init__(self, size: int, keys: Optional[Sequence[str]] = None, data_root: Optional[str] = None,
                 file_list: Optional[str] = None):
        base = Path(os.environ.get(ENV) or "data")
        what = type(self).__name__
        self.root = dataset_root(data_root, ENV, base / self.FOLDER, what, env_subdir=self.FOLDER)
        super().__init__(read_file_list(file_list or base / self.LIST, self.root, what, key="file_list"))
        self.size, self.keys = size, list(keys) if keys else None

    def _read(self, i: int) -> dict:
        f = self.files[i]
        img = Image.fromarray(np.load(f).astype(np.uint8)) if f.suffix == ".npy" else read_rgb8(f)
        item = {"image": resize_crop(img, self.size, "center"), "file_path_": str(f)}
        return {k: item[k] for k in self.keys} if self.keys else item


class FFHQTrain(FacesBase):
    """FFHQ, training list."""

    FOLDER, LIST = "ffhq", "ffhqtrain.txt"


class FFHQValidation(FacesBase):
    """FFHQ, validation list."""

    FOLDER, LIST = "ffhq", "ffhqvalidation.txt"


class CelebAHQTrain(FacesBase):
    """CelebA-HQ, training list."""

    FOLDER, LIST = "celebahq", "celebahqtrain.txt"


class CelebAHQValidation(FacesBase):
    """CelebA-HQ, validation list."""

    FOLDER, LIST = "celebahq", "celebahqvalidation.txt"
