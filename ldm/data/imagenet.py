"""ILSVRC2012 from a local copy, with CompVis' class and parameter names (`ldm.data.imagenet.*`).

Layout: `<data_root>/<split>/<synset>/*.JPEG` with split folder `train` or `val` (`validation` is accepted too),
or CompVis' cache layout `<data_root>/ILSVRC2012_{train,validation}/data/<synset>/`. `data_root` is the
`config.data_root` entry, else $LDM_IMAGENET_ROOT, else data/imagenet. Labels follow the sorted synset ids of the
folders present; `keep_orig_class_label` uses the index of all 1,000 synsets instead, read from
`<data_root>/index_synset.yaml` (lines `0: n01440764`) or `LOC_synset_mapping.txt`. Human-readable names come
from `synset_human.txt` or `LOC_synset_mapping.txt` (`n01440764 tench, Tinca tinca`) when present, else the id.
Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ldm.data.folder import first_readable
from ldm.data.local import DatasetNotFound, FileListDataset, dataset_root, load_rgb
from ldm.data.superres import SRBase
from ldm.data.transforms import resize_crop
from ldm.files import read_rgb8

ENV = "LDM_IMAGENET_ROOT"
DEFAULT_ROOT = "data/imagenet"
SPLIT_DIRS = {"train": ("train", "ILSVRC2012_train/data"),
              "validation": ("val", "validation", "ILSVRC2012_validation/data")}
EXTENSIONS = (".jpeg", ".jpg", ".png")


def str_to_indices(spec: str) -> list[int]:
    """CompVis' `sub_indices` syntax: '0-9,20,35-37' -> [0..9, 20, 35, 36, 37]."""
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if "-" in part:
            a, b = (int(x) for x in part.split("-"))
            out.extend(range(a, b + 1))
        elif part:
            out.append(int(part))
    return out


def _read_mapping(root: Path) -> tuple[list[str], dict[str, str]]:
    """(all synsets in index order, synset -> human name) from the index files present under `root`."""
    order: list[str] = []
    names: dict[str, str] = {}
    idx = root / "index_synset.yaml"
    if idx.is_file():
        pairs = [ln.split(":", 1) for ln in idx.read_text().splitlines() if ":" in ln]
        order = [s.strip() for _, s in sorted(pairs, key=lambda p: int(p[0]))]
    for name in ("LOC_synset_mapping.txt", "synset_human.txt"):
        f = root / name
        if f.is_file():
            rows = [ln.split(None, 1) for ln in f.read_text().splitlines() if ln.strip()]
            names.update({r[0]: (r[1].strip() if len(r) > 1 else r[0]) for r in rows})
            if not order and name == "LOC_synset_mapping.txt":
                order = [r[0] for r in rows]
    return order, names


class ImageNetBase(FileListDataset):
    """ILSVRC2012 images with `class_label`, `human_label`, `synset`, `relpath` and `file_path_`."""

    SPLIT = "train"

    def __init__(self, config: Optional[Mapping[str, Any]] = None, process_images: bool = True,
                 data_root: Optional[str] = None, **kwargs: Any):
        cfg = dict(config or {}) | kwargs
        self.size = cfg.get("size")
        self.random_crop = bool(cfg.get("random_crop", False))
        self.flip = bool(cfg.get("random_flip", False))
        self.keep_orig_class_label = bool(cfg.get("keep_orig_class_label", False))
        self.process_images, self.seed = process_images, cfg.get("seed")
        what = type(self).__name__
        base = dataset_root(cfg.get("data_root", data_root), ENV, DEFAULT_ROOT, what, key="config.data_root")
        split_dir = next((base / d for d in SPLIT_DIRS[self.SPLIT] if (base / d).is_dir()), None)
        if split_dir is None:
            raise DatasetNotFound(f"{what}: no {self.SPLIT} folder under {base} (looked for "
                                  f"{', '.join(SPLIT_DIRS[self.SPLIT])}); synset folders go there")
        synsets = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        order, names = _read_mapping(base)
        if "sub_indices" in cfg and cfg["sub_indices"] is not None:
            if not order:
                raise DatasetNotFound(f"{what}: sub_indices needs the synset index ({base}/index_synset.yaml or "
                                      f"LOC_synset_mapping.txt)")
            wanted = {order[i] for i in str_to_indices(cfg["sub_indices"])}
            synsets = [s for s in synsets if s in wanted]
        files, self.synsets_of = [], []
        for s in synsets:
            for f in sorted(p for p in (split_dir / s).iterdir() if p.suffix.lower() in EXTENSIONS):
                files.append(f)
                self.synsets_of.append(s)
        super().__init__(files)
        if not self.files:
            raise DatasetNotFound(f"{what}: no images ({', '.join(EXTENSIONS)}) in synset folders under {split_dir}")
        if self.keep_orig_class_label:
            if not order:
                raise DatasetNotFound(f"{what}: keep_orig_class_label needs the index of all synsets: put "
                                      f"index_synset.yaml or LOC_synset_mapping.txt in {base}")
            index = {s: i for i, s in enumerate(order)}
            unknown = sorted(set(synsets) - set(index))
            if unknown:
                raise DatasetNotFound(f"{what}: synsets {unknown[:3]} are not in the index under {base}")
        else:
            index = {s: i for i, s in enumerate(synsets)}
        self.class_labels = [index[s] for s in self.synsets_of]
        self.human_names = names
        self.root, self.split_dir = base, split_dir

    def _read(self, i: int) -> dict:
        s = self.synsets_of[i]
        item = {"class_label": self.class_labels[i], "human_label": self.human_names.get(s, s), "synset": s,
                "relpath": str(self.files[i].relative_to(self.split_dir)), "file_path_": str(self.files[i])}
        if self.process_images:
            rng = np.random.default_rng(None if self.seed is None else [int(self.seed), i])
            item["image"] = resize_crop(read_rgb8(self.files[i]), self.size, "random" if self.random_crop else "center",
                                        self.flip, rng)
        return item


class ImageNetTrain(ImageNetBase):
    """The ILSVRC2012 training split."""

    SPLIT = "train"


class ImageNetValidation(ImageNetBase):
    """The ILSVRC2012 validation split (one folder per synset)."""

    SPLIT = "validation"


class _ImageNetSR(SRBase):
    """ImageNet super-resolution pairs: `image` and its degraded `LR_image` (ldm.data.superres)."""

    SPLIT = "train"

    def __init__(self, size: int = 256, degradation: str = "bsrgan_light", downscale_f: int = 4,
                 min_crop_f: float = 0.5, max_crop_f: float = 1.0, random_crop: bool = True,
                 data_root: Optional[str] = None, seed: int = 0, **kwargs: Any):
        super().__init__(size, degradation=degradation, downscale_f=downscale_f, min_crop_f=min_crop_f,
                         max_crop_f=max_crop_f, random_crop=random_crop, seed=seed)
        base = ImageNetTrain if self.SPLIT == "train" else ImageNetValidation
        self.base = base(config=dict(kwargs, data_root=data_root), process_images=False)

    def __len__(self) -> int:
        return len(self.base)

    def photo(self, i: int) -> np.ndarray:
        return load_rgb(self.base.files[i])

    def __getitem__(self, i: int) -> dict:
        return first_readable(self.base.files, self.base.bad, i,
                              lambda j: super(_ImageNetSR, self).__getitem__(j) | self.base._read(j))


class ImageNetSRTrain(_ImageNetSR):
    """Training pairs (random crops)."""

    SPLIT = "train"


class ImageNetSRValidation(_ImageNetSR):
    """Validation pairs."""

    SPLIT = "validation"
