"""Inpainting training masks: random boxes and LaMa-style free-form strokes (Suvorov et al. 2022), 1 = fill.

Every generator is deterministic per (seed, index): `MaskGenerator(seed=s)(index, h, w)` returns the
same mask on every call, in every worker. Stroke and box sizes are given for a 256-pixel side (the
resolution LaMa's presets were published for) and scaled to the requested size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

REFERENCE_SIDE = 256  # the side the preset lengths and widths below are measured on


@dataclass(frozen=True)
class StrokeParams:
    """Free-form strokes: `min_times`..`max_times` polylines of up to `max_vertices` segments (LaMa's irregular masks)."""
    min_times: int
    max_times: int
    max_width: float   # stroke width, pixels at REFERENCE_SIDE
    max_len: float     # segment length, pixels at REFERENCE_SIDE
    max_angle: float   # turn between segments, radians
    max_vertices: int = 5


@dataclass(frozen=True)
class BoxParams:
    """`min_times`..`max_times` axis-aligned boxes with sides in [min_size, max_size], `margin` from the border."""
    min_times: int
    max_times: int
    min_size: float
    max_size: float
    margin: float = 10.0


@dataclass(frozen=True)
class MaskPreset:
    """A preset: strokes and/or boxes drawn into one mask."""
    strokes: Optional[StrokeParams] = None
    boxes: Optional[BoxParams] = None


# LaMa's published thin / medium / thick settings (256 px); "box" is boxes alone.
PRESETS: dict[str, MaskPreset] = {
    "thin": MaskPreset(strokes=StrokeParams(min_times=4, max_times=50, max_width=10, max_len=40, max_angle=4)),
    "medium": MaskPreset(strokes=StrokeParams(min_times=1, max_times=5, max_width=50, max_len=100, max_angle=4),
                         boxes=BoxParams(min_times=1, max_times=3, min_size=30, max_size=150)),
    "thick": MaskPreset(strokes=StrokeParams(min_times=1, max_times=5, max_width=100, max_len=200, max_angle=4),
                        boxes=BoxParams(min_times=1, max_times=4, min_size=30, max_size=150)),
    "box": MaskPreset(boxes=BoxParams(min_times=1, max_times=1, min_size=64, max_size=160, margin=0)),
}


def _draw_strokes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int, p: StrokeParams,
                  scale: float) -> None:
    """Random-walk polylines with round joints: each vertex turns by up to max_angle and steps up to max_len."""
    for _ in range(int(rng.integers(p.min_times, p.max_times + 1))):
        x, y = float(rng.integers(0, w)), float(rng.integers(0, h))
        for _ in range(int(rng.integers(1, p.max_vertices + 1))):
            angle = float(rng.uniform(0, p.max_angle))
            if rng.random() < 0.5:
                angle = 2 * np.pi - angle
            length = (10 + float(rng.uniform(0, p.max_len))) * scale  # LaMa: 10 + U(0, max_len), 5 + U(0, max_width)
            width = max(1, int(round((5 + float(rng.uniform(0, p.max_width))) * scale)))
            nx = float(np.clip(x + length * np.sin(angle), 0, w - 1))
            ny = float(np.clip(y + length * np.cos(angle), 0, h - 1))
            draw.line([(x, y), (nx, ny)], fill=255, width=width)
            r = width / 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
            x, y = nx, ny


def _draw_boxes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int, p: BoxParams,
                scale: float) -> None:
    margin = int(round(p.margin * scale))
    for _ in range(int(rng.integers(p.min_times, p.max_times + 1))):
        bw = int(round(rng.uniform(p.min_size, p.max_size) * scale))
        bh = int(round(rng.uniform(p.min_size, p.max_size) * scale))
        bw, bh = max(1, min(bw, w - 2 * margin)), max(1, min(bh, h - 2 * margin))
        left = int(rng.integers(margin, max(margin, w - margin - bw) + 1))
        top = int(rng.integers(margin, max(margin, h - margin - bh) + 1))
        draw.rectangle([left, top, left + bw - 1, top + bh - 1], fill=255)


def draw_preset(rng: np.random.Generator, h: int, w: int, preset: Union[str, MaskPreset]) -> np.ndarray:
    """A float32 (h, w) mask in {0, 1} of one preset, sizes scaled from REFERENCE_SIDE to min(h, w)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown mask preset '{preset}': use one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    scale = min(h, w) / REFERENCE_SIDE
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if preset.strokes is not None:
        _draw_strokes(draw, rng, h, w, preset.strokes, scale)
    if preset.boxes is not None:
        _draw_boxes(draw, rng, h, w, preset.boxes, scale)
    return (np.asarray(canvas) > 127).astype(np.float32)


@dataclass
class MaskGenerator:
    """Masks drawn from a mix of presets (`mix`: name -> weight), all-ones with probability `p_full`.

    Deterministic per (seed, index); 1 marks the pixels to fill, 0 the known ones.
    """
    mix: Mapping[str, float] = field(default_factory=lambda: {"thin": 1.0, "medium": 1.0, "thick": 1.0, "box": 1.0})
    p_full: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mix) - set(PRESETS))
        if unknown:
            raise ValueError(f"MaskGenerator: unknown preset(s) {unknown} in mix; use {sorted(PRESETS)}")
        weights = np.asarray([float(v) for v in self.mix.values()], dtype=np.float64)
        if not len(weights) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"MaskGenerator: mix weights must be non-negative with a positive sum, got {dict(self.mix)}")
        if not 0.0 <= self.p_full <= 1.0:
            raise ValueError(f"MaskGenerator: p_full must lie in [0, 1], got {self.p_full}")
        self._names, self._p = list(self.mix), weights / weights.sum()

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), int(index), 0x6D61736B])  # stream tag "mask"

    def __call__(self, index: int, h: int, w: int) -> np.ndarray:
        rng = self.rng(index)
        if rng.random() < self.p_full:
            return np.ones((h, w), dtype=np.float32)
        name = self._names[int(rng.choice(len(self._names), p=self._p))]
        return draw_preset(rng, h, w, name)


def object_box_mask(h: int, w: int, cx: float, cy: float, half: float, margin: float = 0.0) -> np.ndarray:
    """A box mask (1 inside) covering a square of half-extent `half` (+ `margin`) centred at (cx, cy), in pixels."""
    r = half + margin
    ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    return ((np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)).astype(np.float32)
