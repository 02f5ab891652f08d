"""Bounding-box layouts as the token sequence of the LDM layout-to-image model (the scheme of taming-transformers'
objects-bbox conditional builder): each object is (class token, top-left token, bottom-right token), padded
with the `none` token to `no_max_objects`, followed by the crop's two corner tokens when `encode_crop`.

A corner (x, y) in [0, 1]^2 is one token on an s x s grid, s = floor(sqrt(no_tokens)):
round(y (s-1)) s + round(x (s-1)). The class token is category_no + no_object_classes * modifier, the
modifier's bits being is_group_of (1) and, with `use_additional_parameters`, is_occluded (2), is_depiction (4)
and is_inside (8). With the published setting (8,192 tokens, 30 objects, crop encoded) a layout is 92 tokens,
the `max_seq_len` of the layout-to-image model's BERTEmbedder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Box:
    """One object: class index and corners relative to the image (x0 <= x1, y0 <= y1 in [0, 1])."""

    category_no: int
    x0: float
    y0: float
    x1: float
    y1: float
    is_group_of: bool = False
    is_occluded: bool = False
    is_depiction: bool = False
    is_inside: bool = False


class BBoxLayoutEncoder:
    """Layout <-> token sequence (see the module docstring); `render` draws a layout as an image."""

    def __init__(self, no_object_classes: int = 601, no_max_objects: int = 30, no_tokens: int = 8192,
                 encode_crop: bool = True, use_group_parameter: bool = True, use_additional_parameters: bool = False):
        self.no_object_classes, self.no_max_objects, self.no_tokens = no_object_classes, no_max_objects, no_tokens
        self.encode_crop = encode_crop
        self.use_group_parameter, self.use_additional_parameters = use_group_parameter, use_additional_parameters
        self.no_sections = int(math.sqrt(no_tokens))
        needed = no_object_classes * (16 if use_additional_parameters else 2 if use_group_parameter else 1) + 2
        if no_tokens < needed:
            raise ValueError(f"{no_tokens} tokens cannot represent {no_object_classes} classes with these modifiers "
                             f"(needs {needed})")

    @property
    def none(self) -> int:
        """The padding token."""
        return self.no_tokens - 1

    @property
    def length(self) -> int:
        """Tokens per layout: 3 per object slot, plus 2 for the crop."""
        return 3 * self.no_max_objects + (2 if self.encode_crop else 0)

    def corner_token(self, x: float, y: float) -> int:
        s = self.no_sections
        return int(round(min(max(y, 0.0), 1.0) * (s - 1))) * s + int(round(min(max(x, 0.0), 1.0) * (s - 1)))

    def corner(self, token: int) -> tuple[float, float]:
        s = self.no_sections
        return (token % s) / (s - 1), (token // s) / (s - 1)

    def class_token(self, box: Box) -> int:
        modifier = 0
        if self.use_group_parameter:
            modifier |= int(box.is_group_of)
        if self.use_additional_parameters:
            modifier |= 2 * int(box.is_occluded) | 4 * int(box.is_depiction) | 8 * int(box.is_inside)
        return box.category_no + self.no_object_classes * modifier

    def encode(self, boxes: Sequence[Box], crop: Optional[tuple[float, float, float, float]] = None) -> torch.Tensor:
        """LongTensor (length,): the first `no_max_objects` boxes (in the given order), padding, crop corners."""
        tokens: list[int] = []
        for b in list(boxes)[: self.no_max_objects]:
            tokens += [self.class_token(b), self.corner_token(b.x0, b.y0), self.corner_token(b.x1, b.y1)]
        tokens += [self.none] * (3 * self.no_max_objects - len(tokens))
        if self.encode_crop:
            c = crop or (0.0, 0.0, 1.0, 1.0)
            tokens += [self.corner_token(c[0], c[1]), self.corner_token(c[2], c[3])]
        return torch.tensor(tokens, dtype=torch.long)

    def decode(self, tokens: Sequence[int]) -> list[tuple[int, tuple[float, float, float, float]]]:
        """(category_no, (x0, y0, x1, y1)) of each non-padding object slot."""
        t = [int(v) for v in tokens]
        out = []
        for k in range(self.no_max_objects):
            cls, a, b = t[3 * k: 3 * k + 3]
            if cls == self.none:
                continue
            (x0, y0), (x1, y1) = self.corner(a), self.corner(b)
            out.append((cls % self.no_object_classes, (x0, y0, x1, y1)))
        return out

    def render(self, tokens: Sequence[int], size: int, background: Optional[np.ndarray] = None) -> np.ndarray:
        """The layout drawn as HWC float in [-1, 1]: class-coloured rectangles (over `background` if given)."""
        from PIL import Image, ImageDraw
        canvas = (Image.fromarray(((background + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
                  if background is not None else Image.new("RGB", (size, size), "white"))
        draw = ImageDraw.Draw(canvas)
        w, h = canvas.size
        for cls, (x0, y0, x1, y1) in self.decode(tokens):
            rng = np.random.default_rng(cls)
            color = tuple(int(c) for c in rng.integers(0, 200, 3))
            draw.rectangle([x0 * (w - 1), y0 * (h - 1), x1 * (w - 1), y1 * (h - 1)], outline=color, width=2)
        return np.asarray(canvas, dtype=np.float32) / 127.5 - 1.0


def crop_boxes(boxes: Sequence[Box], crop: tuple[float, float, float, float], flip: bool = False) -> list[Box]:
    """Boxes in the coordinates of `crop` (relative corners of the image), clipped; empty ones dropped."""
    cx0, cy0, cx1, cy1 = crop
    out = []
    for b in boxes:
        x0, x1 = (min(max(v, cx0), cx1) for v in (b.x0, b.x1))
        y0, y1 = (min(max(v, cy0), cy1) for v in (b.y0, b.y1))
        if x1 <= x0 or y1 <= y0:
            continue
        x0, x1 = (x0 - cx0) / (cx1 - cx0), (x1 - cx0) / (cx1 - cx0)
        y0, y1 = (y0 - cy0) / (cy1 - cy0), (y1 - cy0) / (cy1 - cy0)
        if flip:
            x0, x1 = 1.0 - x1, 1.0 - x0
        out.append(Box(b.category_no, x0, y0, x1, y1, b.is_group_of, b.is_occluded, b.is_depiction, b.is_inside))
    return out
