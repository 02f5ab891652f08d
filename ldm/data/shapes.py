"""Procedural text-image dataset: one colored shape on a gray background, with a caption (project spec)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

# -- the grammar (exact spec; the evaluator and the benchmarks rely on it) ---------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 80, 230),
    "yellow": (230, 210, 40), "magenta": (210, 50, 210), "cyan": (40, 210, 210),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# Colours the training grammar never draws: words a trained model has not learned, for fine-tuning (LoRA,
# DreamBooth) to teach. Each sits at least 80 RGB units from every training colour, so the evaluator tells it apart.
NEW_COLORS: dict[str, tuple[int, int, int]] = {"purple": (130, 40, 200), "orange": (245, 130, 20)}
SIZES: dict[str, float] = {"small": 4 / 32, "large": 7 / 32}  # half-extent as a fraction of the side
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72), "center": (0.5, 0.5),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
BACKGROUND_RANGE = (16, 64)  # gray level, uniform, inclusive
JITTER = 1 / 32  # max center jitter as a fraction of the side
SUPERSAMPLE = 4  # anti-aliasing: coverage from SUPERSAMPLE^2 samples per pixel
CANONICAL_TEMPLATE = "a {size} {color} {shape} in the {position}"
PARAPHRASES: tuple[str, ...] = (
    "a {size} {color} {shape} in the {position}",
    "{size} {color} {shape}, {position}",
    "a {color} {shape} that is {size}, located in the {position}",
    "the {position} has a {size} {color} {shape}",
    "picture of a {size} {color} {shape} at the {position}",
)
_SPLIT_CODES = {"train": 0, "validation": 1, "val": 1, "test": 2}


@dataclass(frozen=True)
class ShapeSpec:
    """One scene: attributes plus the sampled background and jittered center (pixels)."""
    shape: str
    color: str
    size: str
    position: str
    background: int
    cx: float
    cy: float

    @property
    def caption(self) -> str:
        return canonical_caption(self.shape, self.color, self.size, self.position)

    @property
    def class_label(self) -> int:
        """Class index of (shape, color); -1 for a colour outside the training grammar (NEW_COLORS)."""
        return class_label(self.shape, self.color) if self.color in COLORS else -1


def canonical_caption(shape: str, color: str, size: str, position: str) -> str:
    """`a {size} {color} {shape} in the {position}`."""
    return CANONICAL_TEMPLATE.format(size=size, color=color, shape=shape, position=position)


def class_label(shape: str, color: str) -> int:
    """Class index of (shape, color): shape-major, 18 classes."""
    return SHAPES.index(shape) * len(COLOR_NAMES) + COLOR_NAMES.index(color)


NUM_CLASSES = len(SHAPES) * len(COLOR_NAMES)


def color_rgb(name: str) -> tuple[int, int, int]:
    """RGB of a training colour or of one of NEW_COLORS."""
    if name in COLORS:
        return COLORS[name]
    if name in NEW_COLORS:
        return NEW_COLORS[name]
    raise ValueError(f"unknown colour '{name}' (expected one of {list(COLORS) + list(NEW_COLORS)})")


def parse_caption(caption: str, colors: Sequence[str] = COLOR_NAMES) -> dict[str, str]:
    """Attributes of a canonical caption (raises ValueError naming the caption otherwise); `colors`: the names read."""
    words = caption.strip().lower()
    out = {}
    for key, names in (("size", SIZE_NAMES), ("color", tuple(colors)), ("shape", SHAPES), ("position", POSITION_NAMES)):
        found = [n for n in names if f" {n}" in f" {words}"]
        if key == "position":  # "center" vs corners: prefer the longest match
            found = sorted(found, key=len, reverse=True)[:1]
        if len(found) != 1:
            raise ValueError(f"caption '{caption}': cannot read the {key} (expected one of {list(names)})")
        out[key] = found[0]
    return out


def sample_spec(rng: np.random.Generator, side: int, attributes: Optional[dict] = None,
                colors: Sequence[str] = COLOR_NAMES) -> ShapeSpec:
    """Draw a scene; `attributes` may fix any of shape/color/size/position; the colour is drawn from `colors`."""
    attributes = attributes or {}
    shape = attributes.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    color = attributes.get("color") or colors[rng.integers(len(colors))]
    size = attributes.get("size") or SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
    position = attributes.get("position") or POSITION_NAMES[rng.integers(len(POSITION_NAMES))]
    bg = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    fx, fy = POSITIONS[position]
    jx, jy = rng.uniform(-JITTER, JITTER, size=2) * side
    return ShapeSpec(shape, color, size, position, bg, fx * side + jx, fy * side + jy)


def coverage(spec: ShapeSpec, side: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (side, side) in [0, 1]."""
    return shape_coverage(spec.shape, spec.cx, spec.cy, SIZES[spec.size] * side, side, supersample)


def shape_coverage(shape: str, cx: float, cy: float, half: float, side: int,
                   supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Pixel coverage (side, side) of `shape` centred at (cx, cy) with half-extent `half`, all in pixels."""
    n = side * supersample
    c = (np.arange(n) + 0.5) / supersample  # sample coordinates in pixel units
    x, y = np.meshgrid(c, c)  # x: column, y: row (y grows downward)
    h = half
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= h * h
    elif shape == "square":
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":  # apex (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h)
        inside = (dy <= h) & (np.abs(dx) <= (dy + h) / 2.0)
    else:
        raise ValueError(f"unknown shape '{shape}'")
    return inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))


def render(spec: ShapeSpec, side: int) -> np.ndarray:
    """uint8 RGB image (side, side, 3) of the scene, anti-aliased."""
    cov = coverage(spec, side)[..., None]
    color = np.asarray(color_rgb(spec.color), dtype=np.float64)
    img = spec.background * (1.0 - cov) + color * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class ShapesDataset(Dataset):
    """Deterministic per (seed, split, index); images cached in memory once rendered. `colors` restricts the colours
    drawn (default: the training grammar's six) and may name NEW_COLORS, e.g. a fine-tuning set for a new word."""

    def __init__(self, size: int = 32, split: Literal["train", "validation", "test"] = "train",
                 num_samples: Optional[int] = None, seed: int = 0, paraphrase_prob: float = 0.0,
                 cache: bool = True, colors: Optional[Sequence[str]] = None):
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got '{split}'")
        if size < 16:
            raise ValueError(f"image size {size} is too small for the shapes grammar (use >= 16)")
        self.colors = tuple(colors) if colors is not None else COLOR_NAMES
        for name in self.colors:
            color_rgb(name)
        if not self.colors:
            raise ValueError("colors is empty: give at least one colour name")
        self.side, self.split, self.seed = int(size), split, int(seed)
        self.num_samples = int(num_samples if num_samples is not None else (20000 if split == "train" else 1000))
        self.paraphrase_prob = float(paraphrase_prob)
        self._cache: Optional[np.ndarray] = np.zeros((self.num_samples, self.side, self.side, 3), np.uint8) if cache else None
        self._done = np.zeros(self.num_samples, dtype=bool)

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])

    def spec(self, index: int) -> ShapeSpec:
        return sample_spec(self._rng(index), self.side, colors=self.colors)

    def image_uint8(self, index: int) -> np.ndarray:
        if self._cache is not None and self._done[index]:
            return self._cache[index]
        img = render(self.spec(index), self.side)
        if self._cache is not None:
            self._cache[index] = img
            self._done[index] = True
        return img

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        spec = self.spec(index)
        img = self.image_uint8(index)
        caption = spec.caption
        if self.paraphrase_prob > 0:
            r = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index, 1])
            if r.random() < self.paraphrase_prob:
                template = PARAPHRASES[r.integers(len(PARAPHRASES))]
                caption = template.format(size=spec.size, color=spec.color, shape=spec.shape, position=spec.position)
        return {
            "image": (img.astype(np.float32) / 127.5 - 1.0),
            "caption": caption,
            "class_label": spec.class_label,
            "shape": spec.shape, "color": spec.color, "size": spec.size, "position": spec.position,
        }


class ShapesTrain(ShapesDataset):
    """Training split of the shapes dataset."""

    def __init__(self, **kwargs):
        super().__init__(split="train", **kwargs)


class ShapesValidation(ShapesDataset):
    """Validation split of the shapes dataset."""

    def __init__(self, **kwargs):
        kwargs.setdefault("num_samples", 1000)
        super().__init__(split="validation", **kwargs)


def random_prompts(n: int, seed: int = 0, colors: Sequence[str] = COLOR_NAMES) -> list[str]:
    """`n` canonical prompts drawn uniformly from the grammar (its colours replaced by `colors` if given)."""
    rng = np.random.default_rng(seed)
    return [canonical_caption(SHAPES[rng.integers(3)], colors[rng.integers(len(colors))], SIZE_NAMES[rng.integers(2)],
                              POSITION_NAMES[rng.integers(5)]) for _ in range(n)]


def all_attribute_names() -> Sequence[str]:
    return ("shape", "color", "size", "position")
