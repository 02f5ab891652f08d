"""LSUN churches / bedrooms from a local copy, with CompVis' class and parameter names (`ldm.data.lsun.*`).

An image folder plus a text file list of paths relative to it, per split: data/lsun/churches with
data/lsun/church_outdoor_{train,val}.txt, and data/lsun/bedrooms with data/lsun/bedrooms_{train,val}.txt
(`data_root`, `txt_file` override them; $LDM_LSUN_ROOT replaces data/lsun). Each image is cropped to its
central square, resized to `size` with `interpolation`, and flipped with probability `flip_p`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ldm.data.local import FileListDataset, dataset_root, read_file_list
from ldm.data.transforms import to_model_range
from ldm.files import read_rgb8

ENV = "LDM_LSUN_ROOT"
INTERPOLATIONS = {"linear": Image.BILINEAR, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "lanczos": Image.LANCZOS, "nearest": Image.NEAREST, "box": Image.BOX}


class LSUNBase(FileListDataset):
    """Images listed in `txt_file` under `data_root`: `image`, `relative_file_path_`, `file_path_`."""

    def __init__(self, txt_file: str, data_root: Optional[str], size: Optional[int] = None,
                 interpolation: str = "bicubic", flip_p: float = 0.5, seed: Optional[int] = None,
                 default_root: Optional[str] = None):
        what = type(self).__name__
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"{what}: interpolation must be one of {sorted(INTERPOLATIONS)}, got '{interpolation}'")
        default = Path(default_root or data_root or ".")
        self.root = dataset_root(data_root, ENV, default, what, env_subdir=default.name)
        super().__init__(read_file_list(txt_file, self.root, what, key="txt_file"))
        self.size, self.interpolation, self.flip_p, self.seed = size, INTERPOLATIONS[interpolation], flip_p, seed

    def _read(self, i: int) -> dict:
        img = read_rgb8(self.files[i])
        w, h = img.size
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        if self.size is not None:
            img = img.resize((self.size, self.size), self.interpolation)
        arr = np.asarray(img)
        rng = np.random.default_rng(None if self.seed is None else [int(self.seed), i])
        if rng.random() < self.flip_p:
            arr = arr[:, ::-1]
        return {"image": to_model_range(arr), "relative_file_path_": str(self.files[i].relative_to(self.root)),
                "file_path_": str(self.files[i])}


def _lsun_dir() -> Path:
    return Path(os.environ.get(ENV) or "data/lsun")


def _split(cls_name: str, folder: str, list_name: str, flip_p: float):
    def __init__(self, txt_file: Optional[str] = None, data_root: Optional[str] = None, flip_p: float = flip_p,
                 **kwargs):
        LSUNBase.__init__(self, txt_file=txt_file or str(_lsun_dir() / list_name), data_root=data_root,
                          flip_p=flip_p, default_root=f"data/lsun/{folder}", **kwargs)
    return type(cls_name, (LSUNBase,), {"__init__": __init__, "__doc__": f"LSUN {folder}: {list_name}."})


LSUNChurchesTrain = _split("LSUNChurchesTrain", "churches", "church_outdoor_train.txt", 0.5)
LSUNChurchesValidation = _split("LSUNChurchesValidation", "churches", "church_outdoor_val.txt", 0.0)
LSUNBedroomsTrain = _split("LSUNBedroomsTrain", "bedrooms", "bedrooms_train.txt", 0.5)
LSUNBedroomsValidation = _split("LSUNBedroomsValidation", "bedrooms", "bedrooms_val.txt", 0.0)
