"""Procedural text-video dataset: one coloured shape moving left, right, up, down or standing still on a gray
background (the shapes grammar of ldm.data.shapes in time), captioned with its size, colour, shape and motion."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from torch.utils.data import Dataset

from ldm.data.shapes import (BACKGROUND_RANGE, COLOR_NAMES, SHAPES, SIZE_NAMES, SIZES, class_label, color_rgb,
                             shape_coverage)

# -- the grammar (the evaluator, ldm.eval.video_shapes, reads it) ------------------------------------
MOTIONS: dict[str, tuple[float, float]] = {  # unit direction (dx, dy); y grows downward
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0),
}
MOTION_NAMES: tuple[str, ...] = tuple(MOTIONS)
# travel over a clip as a fraction of the side: far enough to read the direction from the track at 32 px
TRAVEL = 0.4
MARGIN = 1 / 32  # the shape's edge stays this far (fraction of the side) from the border over the whole clip
TEMPLATE = "a {size} {color} {shape} moving {motion}"
STILL_TEMPLATE = "a {size} {color} {shape} standing still"
IMAGE_TEMPLATE = "a {size} {color} {shape}"  # an image item: T stills of one description, each placed anew
_SPLIT_CODES = {"train": 0, "validation": 1, "val": 1, "test": 2}


def video_caption(shape: str, color: str, size: str, motion: str) -> str:
    """`a {size} {color} {shape} moving {motion}` (`standing still` for no motion)."""
    template = STILL_TEMPLATE if motion == "still" else TEMPLATE
    return template.format(size=size, color=color, shape=shape, motion=motion)


def parse_video_caption(caption: str) -> dict[str, str]:
    """Attributes of a moving-shapes caption (ValueError naming it otherwise)."""
    words = f" {caption.strip().lower()} "
    out = {}
    for key, names in (("size", SIZE_NAMES), ("color", COLOR_NAMES), ("shape", SHAPES)):
        found = [n for n in names if f" {n} " in words or f" {n}," in words]
        if len(found) != 1:
            raise ValueError(f"caption '{caption}': cannot read the {key} (expected one of {list(names)})")
        out[key] = found[0]
    motion = [m for m in MOTION_NAMES if (f" moving {m} " in words if m != "still" else " still " in words)]
    if len(motion) != 1:
        raise ValueError(f"caption '{caption}': cannot read the motion (expected one of {list(MOTION_NAMES)})")
    out["motion"] = motion[0]
    return out


@dataclass(frozen=True)
class MovingShapeSpec:
    """One clip: attributes, background, and the shape's centre in each frame (pixels)."""
    shape: str
    color: str
    size: str
    motion: str
    background: int
    track: tuple[tuple[float, float], ...]

    @property
    def caption(self) -> str:
        return video_caption(self.shape, self.color, self.size, self.motion)


def sample_clip_spec(rng: np.random.Generator, side: int, frames: int, attributes: Optional[dict] = None
                     ) -> MovingShapeSpec:
    """Draw a clip; `attributes` may fix shape / color / size / motion. The start is drawn so that the whole track,
    TRAVEL x side long, stays inside the frame."""
    attributes = attributes or {}
    shape = attributes.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    color = attributes.get("color") or COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    size = attributes.get("size") or SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
    motion = attributes.get("motion") or MOTION_NAMES[rng.integers(len(MOTION_NAMES))]
    bg = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    dx, dy = MOTIONS[motion]
    travel = TRAVEL * side
    lo = (SIZES[size] + MARGIN) * side
    hi = side - lo
    # the start: anywhere the end point stays within [lo, hi] too
    x0 = rng.uniform(lo - min(dx, 0) * travel, hi - max(dx, 0) * travel)
    y0 = rng.uniform(lo - min(dy, 0) * travel, hi - max(dy, 0) * travel)
    steps = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    track = tuple((float(x0 + dx * travel * s), float(y0 + dy * travel * s)) for s in steps)
    return MovingShapeSpec(shape, color, size, motion, bg, track)


def render_clip(spec: MovingShapeSpec, side: int) -> np.ndarray:
    """uint8 RGB frames (T, side, side, 3), anti-aliased."""
    color = np.asarray(color_rgb(spec.color), dtype=np.float64)
    out = []
    for cx, cy in spec.track:
        cov = shape_coverage(spec.shape, cx, cy, SIZES[spec.size] * side, side)[..., None]
        out.append(np.clip(np.rint(spec.background * (1.0 - cov) + color * cov), 0, 255).astype(np.uint8))
    return np.stack(out)


class MovingShapes(Dataset):
    """Deterministic per (seed, split, index). Items: {"video": float32 (T, size, size, 3) in [-1, 1], "caption",
    "class_label" (the image grammar's shape x colour class), "shape", "color", "size", "motion",
    "image_only_indicator"}. With `image_prob`, that share of items are T independent still images of one shape,
    colour and size (indicator 1), for joint image + video training."""

    def __init__(self, size: int = 32, frames: int = 8, split: Literal["train", "validation", "test"] = "train",
                 num_samples: Optional[int] = None, seed: int = 0, image_prob: float = 0.0, cache: bool = True):
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got '{split}'")
        if size < 16:
            raise ValueError(f"clip size {size} is too small for the shapes grammar (use >= 16)")
        if frames < 2:
            raise ValueError(f"frames {frames}: a clip needs at least 2 frames to move")
        if not 0.0 <= image_prob <= 1.0:
            raise ValueError(f"image_prob {image_prob} must be in [0, 1]")
        self.side, self.frames, self.split, self.seed = int(size), int(frames), split, int(seed)
        self.num_samples = int(num_samples if num_samples is not None else (5000 if split == "train" else 200))
        self.image_prob = float(image_prob)
        self._cache: dict[int, np.ndarray] = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index, stream])

    def spec(self, index: int) -> MovingShapeSpec:
        return sample_clip_spec(self._rng(index), self.side, self.frames)

    def is_image_item(self, index: int) -> bool:
        return self.image_prob > 0 and self._rng(index, 1).random() < self.image_prob

    def _still_images(self, index: int, spec: MovingShapeSpec) -> np.ndarray:
        """T independent still scenes of the clip's shape, colour and size (each its own place and background)."""
        attrs = {"shape": spec.shape, "color": spec.color, "size": spec.size, "motion": "still"}
        return np.concatenate([render_clip(sample_clip_spec(self._rng(index, 2 + k), self.side, 1, attrs), self.side)
                               for k in range(self.frames)])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        spec = self.spec(index)
        image_item = self.is_image_item(index)
        if self._cache is not None and index in self._cache:
            frames = self._cache[index]
        else:
            frames = self._still_images(index, spec) if image_item else render_clip(spec, self.side)
            if self._cache is not None:
                self._cache[index] = frames
        caption = IMAGE_TEMPLATE.format(size=spec.size, color=spec.color, shape=spec.shape) if image_item \
            else spec.caption
        return {"video": frames.astype(np.float32) / 127.5 - 1.0, "caption": caption,
                "class_label": class_label(spec.shape, spec.color), "shape": spec.shape, "color": spec.color,
                "size": spec.size, "motion": "still" if image_item else spec.motion,
                "image_only_indicator": float(image_item)}
