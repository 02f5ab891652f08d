"""Prompt adherence for moving-shapes clips (ldm.data.moving_shapes) by classical image analysis: each frame's size,
colour and shape (ldm.eval.shapes_eval), the direction of motion from the object's track, and whether the object
keeps its colour and shape from frame to frame."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ldm.data.moving_shapes import MOTIONS, TRAVEL, parse_video_caption
from ldm.errors import InputError
from ldm.eval.shapes_eval import Reading, read_image

FRAME_ATTRIBUTES = ("shape", "color", "size")
# a track whose end-to-end displacement is below this fraction of the side reads as still (the data moves TRAVEL)
STILL_MAX = TRAVEL / 4


def read_clip(frames: Union[np.ndarray, torch.Tensor]) -> list[Reading]:
    """The reading of each frame of a (T, H, W, C) clip (uint8, or floats in [-1, 1]); (C, T, H, W) tensors too."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().float()
        if frames.dim() == 4 and frames.shape[0] in (1, 3) and frames.shape[-1] not in (1, 3):
            frames = frames.movedim(0, -1)  # (C, T, H, W) -> (T, H, W, C)
        frames = frames.numpy()
    return [read_image(f) for f in frames]


def motion_of(readings: Sequence[Reading]) -> Optional[str]:
    """left / right / up / down / still from the track's first and last found centres; None without a track."""
    centers = [r.center for r in readings if r.center is not None]
    if len(centers) < 2:
        return None
    dx, dy = np.subtract(centers[-1], centers[0])
    if max(abs(dx), abs(dy)) < STILL_MAX:
        return "still"
    direction = np.array([dx, dy]) / np.hypot(dx, dy)
    moving = {m: v for m, v in MOTIONS.items() if m != "still"}
    return max(moving, key=lambda m: float(np.dot(direction, moving[m])))


def consistent(readings: Sequence[Reading]) -> bool:
    """Whether every frame shows one object of the same colour and shape."""
    return all(r.shape is not None for r in readings) and len({(r.shape, r.color) for r in readings}) == 1


def score_clips(clips: Iterable, prompts: Sequence[Union[str, dict]]) -> dict:
    """Per-frame accuracy of shape / colour / size and of all three, motion accuracy, temporal consistency (share
    of clips whose object keeps its colour and shape) and the share of clips right in everything."""
    frame_hits = {a: 0 for a in FRAME_ATTRIBUTES}
    frames_all = frames = motion_ok = steady = clips_all = n = 0
    for clip, prompt in zip(clips, prompts):
        want = parse_video_caption(prompt) if isinstance(prompt, str) else prompt
        readings = read_clip(clip)
        per_frame = [all(getattr(r, a) == want[a] for a in FRAME_ATTRIBUTES) for r in readings]
        for r in readings:
            for a in FRAME_ATTRIBUTES:
                frame_hits[a] += int(getattr(r, a) == want[a])
        frames += len(readings)
        frames_all += sum(per_frame)
        moved = motion_of(readings) == want["motion"]
        motion_ok += int(moved)
        steady += int(consistent(readings))
        clips_all += int(moved and all(per_frame))
        n += 1
    if n == 0:
        raise InputError("score_clips() got no clips")
    out = {f"frame_{a}": frame_hits[a] / frames for a in FRAME_ATTRIBUTES}
    out.update(frame_all=frames_all / frames, motion=motion_ok / n, consistency=steady / n, all=clips_all / n, n=n)
    return out
