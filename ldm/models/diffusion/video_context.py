"""Context frames for prediction and interpolation (Blattmann et al. 2023, "Align your Latents", sec. 3.2-3.3): a
per-frame mask says which frames are given; their latents (zero elsewhere) and the mask are concatenated to the
noisy latents, so one model continues a clip from its first frames or fills the frames between keyframes."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional, Sequence

import torch

from ldm.util import ConfigError


class ContextMode(str, Enum):
    """Which frames a training clip is given: none (generation), the first k (prediction), the first and the last
    (interpolation)."""
    NONE = "none"
    PREDICT = "predict"
    INTERPOLATE = "interpolate"


def prediction_mask(frames: int, given: int, device: Any = None) -> torch.Tensor:
    """(T,) 1 for the first `given` frames."""
    m = torch.zeros(frames, device=device)
    m[:given] = 1.0
    return m


def interpolation_mask(frames: int, device: Any = None) -> torch.Tensor:
    """(T,) 1 for the first and the last frame (the keyframes)."""
    m = torch.zeros(frames, device=device)
    m[0] = m[-1] = 1.0
    return m


def context_concat(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C + 1, T, h, w): the given frames' latents (zeros elsewhere) and the mask, for (B, C, T, h, w) latents and
    a (B, T) mask."""
    m = mask.to(z.dtype)[:, None, :, None, None]
    return torch.cat([z * m, m.expand(-1, 1, -1, *z.shape[-2:])], dim=1)


@dataclass(frozen=True)
class ContextFrames:
    """The training draw of context masks: a mode per clip (uniform over `modes`), for prediction 1..`max_given`
    first frames."""
    modes: tuple[ContextMode, ...] = (ContextMode.NONE, ContextMode.PREDICT, ContextMode.INTERPOLATE)
    max_given: int = 2

    @classmethod
    def from_config(cls, cfg: Any) -> "ContextFrames":
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {"modes", "max_given"})
        if unknown:
            raise ConfigError(f"model.params.context_frames: unknown keys {unknown}; accepted: modes, max_given")
        try:
            modes = tuple(ContextMode(m) for m in cfg.get("modes", [m.value for m in cls.modes]))
        except ValueError:
            raise ConfigError(f"model.params.context_frames.modes {list(cfg.get('modes'))}: each one of "
                              f"{[m.value for m in ContextMode]}") from None
        max_given = int(cfg.get("max_given", cls.max_given))
        if not modes or max_given < 1:
            raise ConfigError("model.params.context_frames: give at least one mode and max_given >= 1")
        return cls(modes, max_given)

    def draw(self, clips: int, frames: int, device: Any = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(clips, frames) masks, one mode per clip."""
        picks = torch.randint(len(self.modes), (clips,), generator=generator).tolist()
        given = torch.randint(1, min(self.max_given, frames - 1) + 1, (clips,), generator=generator).tolist()
        rows = []
        for mode, k in zip((self.modes[i] for i in picks), given):
            if mode is ContextMode.PREDICT:
                rows.append(prediction_mask(frames, k))
            elif mode is ContextMode.INTERPOLATE:
                rows.append(interpolation_mask(frames))
            else:
                rows.append(torch.zeros(frames))
        return torch.stack(rows).to(device)


def given_frames(mask: torch.Tensor) -> Sequence[int]:
    """The indices a (T,) mask gives."""
    return [int(i) for i in torch.nonzero(mask > 0).flatten()]
