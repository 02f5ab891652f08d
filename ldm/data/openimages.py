"""CompVis `ldm.data.openimages` names (never published by CompVis) over a local copy of Open Images: one folder of
images per split (`root` / `datapath`, default data/openimages/{train,validation}, or $LDM_OPENIMAGES_ROOT).

- `SuperresOpenImagesAdvanced{Train,Validation}`: super-resolution pairs (parameters: ldm.data.superres);
- `FullOpenImages{Train,Validation}`: the images, resized and cropped (autoencoder training);
- `OpenImagesBBox{Train,Validation}`: images with their boxes from `<split>-annotations-bbox.csv` and the class
  list `class-descriptions-boxable.csv`, encoded as the layout-to-image model's token sequence
  (`coordinates_bbox`, ldm.data.layout).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from ldm.data.folder import IMAGE_EXTENSIONS, scan_images
from ldm.data.local import DatasetNotFound, FileListDataset, dataset_root
from ldm.data.superres import SuperresFolder
from ldm.data.transforms import resize_crop, to_model_range
from ldm.files import read_rgb8

ENV = "LDM_OPENIMAGES_ROOT"
DEFAULT_ROOT = Path("data/openimages")
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "area": Image.BOX,
            "lanczos": Image.LANCZOS}


class SuperresOpenImagesAdvancedTrain(SuperresFolder):
    """Training split: random crops of `root` (default data/openimages/train)."""

    def __init__(self, size: int, root: Optional[Union[str, Path]] = None, **kwargs: Any):
        super().__init__(root if root is not None else DEFAULT_ROOT / "train", size=size, **kwargs)


class SuperresOpenImagesAdvancedValidation(SuperresFolder):
    """Validation split: `root` (default data/openimages/validation)."""

    def __init__(self, size: int, root: Optional[Union[str, Path]] = None, **kwargs: Any):
        super().__init__(root if root is not None else DEFAULT_ROOT / "validation", size=size, **kwargs)


class FullOpenImagesBase(FileListDataset):
    """All images of a split (`<root>/<split>/`): short side resized to `size` with `interpolation`, then a
    `crop_size` square crop (random or centred); items `image` and `file_path_`."""

    SPLIT = "train"

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None, random_crop: bool = True,
                 interpolation: str = "bicubic", root: Optional[Union[str, Path]] = None, seed: Optional[int] = None):
        what = type(self).__name__
        if interpolation not in RESAMPLE:
            raise ValueError(f"{what}: interpolation must be one of {sorted(RESAMPLE)}, got '{interpolation}'")
        split_dir = dataset_root(Path(root) / self.SPLIT if root else None, ENV, DEFAULT_ROOT / self.SPLIT, what,
                                 key="root")
        super().__init__(scan_images(split_dir, IMAGE_EXTENSIONS))
        if not self.files:
            raise DatasetNotFound(f"{what}: no images under {split_dir}")
        self.size, self.crop_size, self.random_crop, self.seed = size, crop_size, random_crop, seed
        self.resample = RESAMPLE[interpolation]

    def _read(self, i: int) -> dict:
        img = read_rgb8(self.files[i])
        if self.size is not None:
            w, h = img.size
            s = self.size / min(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), self.resample)
        rng = np.random.default_rng(None if self.seed is None else [int(self.seed), i])
        crop = "random" if self.random_crop else "center"
        image = resize_crop(img, self.crop_size, crop, False, rng) if self.crop_size else to_model_range(np.asarray(img))
        return {"image": image, "file_path_": str(self.files[i])}


class FullOpenImagesTrain(FullOpenImagesBase):
    """Open Images training images (data/openimages/train)."""

    SPLIT = "train"

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None, random_crop: bool = True,
                 interpolation: str = "bicubic", **kwargs: Any):
        super().__init__(size, crop_size, random_crop, interpolation, **kwargs)


class FullOpenImagesValidation(FullOpenImagesBase):
    """Open Images validation images (data/openimages/validation)."""

    SPLIT = "validation"

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None, random_crop: bool = False,
                 interpolation: str = "bicubic", **kwargs: Any):
        super().__init__(size, crop_size, random_crop, interpolation, **kwargs)


CLASS_LIST = "class-descriptions-boxable.csv"
BOX_FILE = "{split}-annotations-bbox.csv"


def read_boxes(csv_path: Path, class_index: dict[str, int], wanted: set[str]) -> dict[str, list]:
    """Image id -> its Box list, from an Open Images box CSV (XMin, XMax, YMin, YMax relative; Is* flags)."""
    import csv

    from ldm.data.layout import Box
    boxes: dict[str, list] = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            image_id = row["ImageID"]
            if image_id not in wanted or row["LabelName"] not in class_index:
                continue
            flag = lambda k: row.get(k, "0") == "1"  # noqa: E731
            boxes.setdefault(image_id, []).append(Box(
                class_index[row["LabelName"]], float(row["XMin"]), float(row["YMin"]), float(row["XMax"]),
                float(row["YMax"]), flag("IsGroupOf"), flag("IsOccluded"), flag("IsDepiction"), flag("IsInside")))
    return boxes


class OpenImagesBBoxBase(FileListDataset):
    """Open Images images with box layouts: `image`, `coordinates_bbox` (tokens), `bbox_img`, `image_with_bboxes`.

    Reads `<datapath>/class-descriptions-boxable.csv` (LabelName, DisplayName; the row is the class index),
    `<datapath>/<split>-annotations-bbox.csv` and the images `<datapath>/<split>/<ImageID>.jpg`. Crops:
    `random-2d` (random square), `center`, or `none` (squash); the crop is encoded after the objects.
    """

    def __init__(self, data_path: Union[str, Path], split: str, keys: list, target_image_size: int,
                 no_max_samples: int = -1, crop_method: str = "center", random_flip: bool = False,
                 encode_crop: bool = True, no_max_objects: int = 30, no_tokens: int = 8192,
                 use_group_parameter: bool = True, use_additional_parameters: bool = False,
                 min_objects_per_image: int = 1, seed: Optional[int] = None):
        from ldm.data.layout import BBoxLayoutEncoder
        what = type(self).__name__
        if crop_method not in ("random-2d", "center", "none"):
            raise ValueError(f"{what}: crop_type must be 'random-2d', 'center' or 'none', got '{crop_method}'")
        root = dataset_root(data_path, ENV, DEFAULT_ROOT, what, key="datapath")
        for need in (root / CLASS_LIST, root / BOX_FILE.format(split=split)):
            if not need.is_file():
                raise DatasetNotFound(f"{what}: {need} not found (the Open Images class list and box CSV go in "
                                      f"`datapath`, {root})")
        image_dir = dataset_root(root / split, ENV, root / split, what, key="datapath")
        import csv
        with open(root / CLASS_LIST, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
        if rows and rows[0][0] == "LabelName":
            rows = rows[1:]
        self.class_names = [r[1] if len(r) > 1 else r[0] for r in rows]
        class_index = {r[0]: i for i, r in enumerate(rows)}
        images = {p.stem: p for p in scan_images(image_dir, IMAGE_EXTENSIONS)}
        boxes = read_boxes(root / BOX_FILE.format(split=split), class_index, set(images))
        ids = sorted(i for i in images if len(boxes.get(i, [])) >= min_objects_per_image)
        if no_max_samples > 0:
            ids = ids[:no_max_samples]
        if not ids:
            raise DatasetNotFound(f"{what}: no image under {image_dir} has boxes in {BOX_FILE.format(split=split)}")
        super().__init__([images[i] for i in ids])
        self.ids, self.boxes = ids, boxes
        self.encoder = BBoxLayoutEncoder(len(self.class_names), no_max_objects, no_tokens, encode_crop,
                                         use_group_parameter, use_additional_parameters)
        self.keys, self.size, self.crop_method, self.random_flip, self.seed = keys, target_image_size, crop_method, \
            random_flip, seed

    def _read(self, i: int) -> dict:
        from ldm.data.layout import crop_boxes
        rng = np.random.default_rng(None if self.seed is None else [int(self.seed), i])
        img = read_rgb8(self.files[i])
        w, h = img.size
        if self.crop_method == "none":
            crop = (0.0, 0.0, 1.0, 1.0)
        else:
            side = min(w, h)
            left = int(rng.integers(0, w - side + 1)) if self.crop_method == "random-2d" else (w - side) // 2
            top = int(rng.integers(0, h - side + 1)) if self.crop_method == "random-2d" else (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            crop = (left / w, top / h, (left + side) / w, (top + side) / h)
        img = img.resize((self.size, self.size), Image.BICUBIC)
        flip = bool(self.random_flip and rng.random() < 0.5)
        arr = np.asarray(img)[:, ::-1] if flip else np.asarray(img)
        boxes = sorted(crop_boxes(self.boxes[self.ids[i]], crop, flip), key=lambda b: (b.y0, b.x0))
        tokens = self.encoder.encode(boxes, crop)
        image = to_model_range(arr)
        item = {"image": image, "coordinates_bbox": tokens, "file_path_": str(self.files[i])}
        if "bbox_img" in self.keys:
            item["bbox_img"] = self.encoder.render(tokens, self.size)
        if "image_with_bboxes" in self.keys:
            item["image_with_bboxes"] = self.encoder.render(tokens, self.size, background=image)
        return {k: v for k, v in item.items() if k in self.keys or k == "file_path_"}


BBOX_KEYS = ["image", "coordinates_bbox", "bbox_img", "image_with_bboxes"]


class OpenImagesBBoxTrain(OpenImagesBBoxBase):
    """Training split: random square crops, random flips."""

    def __init__(self, size: int, encode_bbox: bool = True, datapath: Union[str, Path] = DEFAULT_ROOT,
                 n_max_samples: int = -1, random_flip: bool = True, crop_type: str = "random-2d",
                 keys: Optional[list] = None, **kwargs: Any):
        super().__init__(datapath, "train", keys or BBOX_KEYS, size, n_max_samples, crop_type, random_flip,
                         encode_crop=encode_bbox, **kwargs)


class OpenImagesBBoxValidation(OpenImagesBBoxBase):
    """Validation split: centre crops."""

    def __init__(self, size: int, encode_bbox: bool = True, datapath: Union[str, Path] = DEFAULT_ROOT,
                 n_max_samples: int = -1, random_flip: bool = False, crop_type: str = "center",
                 keys: Optional[list] = None, **kwargs: Any):
        super().__init__(datapath, "validation", keys or BBOX_KEYS, size, n_max_samples, crop_type, random_flip,
                         encode_crop=encode_bbox, **kwargs)
