"""Prompt adherence for shapes images by classical image analysis: read back size, color, shape, position."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ldm.errors import InputError
from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, color_rgb, parse_caption, shape_coverage

ATTRIBUTES = ("shape", "color", "size", "position")
# A pixel belongs to the object where it is at least this far (fraction) from background to object color.
MASK_LEVEL = 0.5
# Moments of each shape with half-extent h (apex-up triangle as the dataset draws it), per unit h:
# area / h^2, centroid's offset below the shape's centre / h, and (var_x + var_y) / h^2.
SHAPE_MOMENTS = {"circle": (np.pi, 0.0, 1 / 2), "square": (4.0, 0.0, 2 / 3), "triangle": (2.0, 1 / 3, 7 / 18)}
# The object's soft mask is compared within this many pixels (per 32 of image side) around its mask.
WINDOW_MARGIN = 3
# Object-strength mass outside that window, as a fraction of the object's own mass, above which the
# image is clutter rather than one shape (its shape reads None, so it cannot match any prompt).
CLUTTER_MAX = 0.25
# Squared error of the best-fitting shape over the object's squared soft mass, above which the object
# is not any of the shapes (reads None). Validation images with blur up to 1.1 px or noise of 0.08
# (in [-1, 1]) stay under 0.12.
FIT_MAX = 0.15


@dataclass
class Reading:
    """What the evaluator reads from one image (None where nothing was found)."""
    shape: Optional[str]
    color: Optional[str]
    size: Optional[str]
    position: Optional[str]
    center: Optional[tuple[float, float]] = None  # the object's (x, y) as fractions of the side (x right, y down)

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


def _to_uint8_hwc(img: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """Accept HWC/CHW, uint8 or float in [-1, 1]; return float64 HWC in [0, 255]."""
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().float().numpy()
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    if img.dtype == np.uint8:
        return img.astype(np.float64)
    return np.clip((img.astype(np.float64) + 1.0) * 127.5, 0, 255)


def palette(colors: Optional[Sequence[str]] = None) -> dict[str, tuple[int, int, int]]:
    """Name -> RGB of the colours the evaluator tells apart: the training grammar's, or `colors` (may name NEW_COLORS)."""
    return dict(COLORS) if colors is None else {name: color_rgb(name) for name in colors}


def read_image(img: Union[np.ndarray, torch.Tensor], colors: Optional[Mapping[str, Sequence[int]]] = None) -> Reading:
    """Segment the object from the (gray, flat) background and classify its attributes; the colour is the nearest
    of `colors` (name -> RGB; default the training grammar's six)."""
    x = _to_uint8_hwc(img)
    side = x.shape[0]
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(x - bg, axis=-1)
    chroma = x.max(-1) - x.min(-1)
    strong = dist > 0.75 * dist.max()
    if dist.max() < 30 or strong.sum() == 0:
        return Reading(None, None, None, None)
    obj_color = x[strong].mean(0)
    ref = np.linalg.norm(obj_color - bg)
    soft = np.clip(dist / max(ref, 1e-6), 0.0, 1.0)
    mask = soft >= MASK_LEVEL
    # keep the connected component holding the strongest pixel (drops stray specks)
    mask = _largest_component(mask)
    if mask.sum() == 0 or chroma[mask].mean() < 20:
        return Reading(None, None, None, None)
    rows, cols = np.nonzero(mask)
    r0, r1 = max(rows.min() - 1, 0), min(rows.max() + 2, side)
    c0, c1 = max(cols.min() - 1, 0), min(cols.max() + 2, side)
    box = soft[r0:r1, c0:c1]
    # Occupancy profiles: an axis-aligned edge's partial coverage counts exactly once.
    col_occ, row_occ = box.max(axis=0), box.max(axis=1)
    w, h = col_occ.sum(), row_occ.sum()
    shape = _classify_shape(soft, mask)
    colors = COLORS if colors is None else colors
    rgb = np.array(list(colors.values()), dtype=np.float64)
    color = list(colors)[int(np.argmin(np.linalg.norm(rgb - obj_color, axis=1)))]
    extent = max(h, w) / side
    small, large = 2 * SIZES["small"], 2 * SIZES["large"]
    size = "small" if extent < (small + large) / 2 else "large"
    cx = (c0 + (col_occ * (np.arange(len(col_occ)) + 0.5)).sum() / w) / side
    cy = (r0 + (row_occ * (np.arange(len(row_occ)) + 0.5)).sum() / h) / side
    names = list(POSITIONS)
    anchors = np.array(list(POSITIONS.values()))
    position = names[int(np.argmin(np.linalg.norm(anchors - np.array([cx, cy]), axis=1)))]
    return Reading(shape, color, size, position, (float(cx), float(cy)))


def _classify_shape(soft: np.ndarray, mask: np.ndarray) -> Optional[str]:
    """Analysis by synthesis: the shape whose blurred rendering best explains the object's soft mask.

    A Gaussian blur keeps an object's mass and centroid and adds sigma^2 to each axis' variance, so
    for each candidate shape the mass gives its half-extent, the centroid its centre and the excess
    variance the blur; the candidate rendered that way (`shape_coverage`, then the blur) with the
    smallest squared error to the soft mask wins. Blur of the decoder or sampler therefore does not
    turn triangles and squares into circles, as a threshold on fill ratios does. None (no single
    shape) when object-strength pixels outside the object's window exceed CLUTTER_MAX of its mass, or
    when even the best candidate's error exceeds FIT_MAX.
    """
    from scipy import ndimage
    side = soft.shape[0]
    margin = max(1, round(WINDOW_MARGIN * side / 32))
    region = ndimage.binary_dilation(mask, iterations=margin)
    obs = np.where(region, soft, 0.0)
    mass = obs.sum()
    stray = np.where(~region & (soft >= MASK_LEVEL), soft, 0.0).sum()
    if stray > CLUTTER_MAX * mass:
        return None
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    cx, cy = (obs * xs).sum() / mass, (obs * ys).sum() / mass
    var = (obs * ((xs - cx) ** 2 + (ys - cy) ** 2)).sum() / mass
    best, best_err = SHAPES[0], np.inf
    for shape in SHAPES:
        area, offset, spread = SHAPE_MOMENTS[shape]
        half = float(np.sqrt(mass / area))
        sigma = float(np.sqrt(max(var - spread * half * half, 0.0) / 2))
        model = shape_coverage(shape, cx, cy - offset * half, half, side)
        if sigma > 0:
            model = ndimage.gaussian_filter(model, sigma)
        err = float(((model - obs) ** 2).sum())
        if err < best_err:
            best, best_err = shape, err
    return best if best_err <= FIT_MAX * float((obs * obs).sum()) else None


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def score(images: Iterable, prompts: Sequence[Union[str, dict]], colors: Optional[Sequence[str]] = None) -> dict:
    """Per-attribute accuracy and the all-four rate of `images` against their prompts (captions or dicts). `colors`:
    the colour names read and told apart (default the training grammar's six; add NEW_COLORS to score a new word)."""
    table = palette(colors)
    hits = {a: 0 for a in ATTRIBUTES}
    all_ok, n = 0, 0
    for img, prompt in zip(images, prompts):
        want = parse_caption(prompt, colors=tuple(table)) if isinstance(prompt, str) else prompt
        got = read_image(img, table).as_dict()
        ok = [got[a] == want[a] for a in ATTRIBUTES]
        for a, o in zip(ATTRIBUTES, ok):
            hits[a] += int(o)
        all_ok += int(all(ok))
        n += 1
    if n == 0:
        raise InputError("score() got no images")
    out = {a: hits[a] / n for a in ATTRIBUTES}
    out["all"] = all_ok / n
    out["n"] = n
    return out
