"""Learning-rate multipliers for `LambdaLR` (CompVis names): linear warm-up then cosine or linear decay.

They return Python floats, so that checkpoints holding scheduler state load with `weights_only=True`.
"""
from __future__ import annotations

from typing import Sequence

import math

import numpy as np


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from lr_start to lr_max over warm_up_steps, then cosine decay to lr_min at max_decay_steps."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0):
        self.lr_warm_up_steps, self.lr_start, self.lr_min, self.lr_max = warm_up_steps, lr_start, lr_min, lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs) -> float:
        if n < self.lr_warm_up_steps:
            return float((self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start)
        t = min((n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps), 1.0)
        return float(self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi)))

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Cycled version of the warm-up + cosine schedule (one entry per cycle in each list)."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        assert len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths)
        self.lr_warm_up_steps, self.f_start, self.f_min, self.f_max = warm_up_steps, f_start, f_min, f_max
        self.cycle_lengths = cycle_lengths
        self.cum_cycles = np.cumsum([0] + list(cycle_lengths))
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        interval = 0
        for cl in self.cum_cycles[1:]:
            if n <= cl:
                return interval
            interval += 1
        return len(self.cycle_lengths) - 1

    def schedule(self, n: int, **kwargs) -> float:
        c = self.find_in_interval(n)
        n = n - self.cum_cycles[c]
        if n < self.lr_warm_up_steps[c]:
            return float((self.f_max[c] - self.f_start[c]) / self.lr_warm_up_steps[c] * n + self.f_start[c])
        t = min((n - self.lr_warm_up_steps[c]) / (self.cycle_lengths[c] - self.lr_warm_up_steps[c]), 1.0)
        return float(self.f_min[c] + 0.5 * (self.f_max[c] - self.f_min[c]) * (1 + math.cos(t * math.pi)))

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Cycled linear warm-up then linear decay (SD v1: 10,000-step warm-up to 1.0)."""

    def schedule(self, n: int, **kwargs) -> float:
        c = self.find_in_interval(n)
        n = n - self.cum_cycles[c]
        if n < self.lr_warm_up_steps[c]:
            return float((self.f_max[c] - self.f_start[c]) / self.lr_warm_up_steps[c] * n + self.f_start[c])
        return float(self.f_min[c] + (self.f_max[c] - self.f_min[c]) * (self.cycle_lengths[c] - n) / self.cycle_lengths[c])
