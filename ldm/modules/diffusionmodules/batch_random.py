"""Training randomness that does not depend on how a batch is split across processes.

Each draw (timesteps, noise, condition dropout, posterior samples) is made for the whole global batch from one
generator seeded by (noise_seed, batch number), the same on every rank, and this rank keeps its rows: rank r of N
holds the global rows r, r + N, ..., as DistributedSampler deals them. So N processes at batch b draw, row for row,
what one process at batch N x b draws, and with `--scale_lr` they take the same optimizer steps.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

# odd multiplier mixing the seed with the batch number into one 63-bit generator seed
_MIX = 0x9E3779B97F4A7C15
_STREAMS = 16
# host-side draws of stream s use generator stream s + _HOST_STREAMS (device streams stay below it)
_HOST_STREAMS = _STREAMS // 2


class GlobalBatchRandom:
    """Draws for the global batch, sliced to this rank's rows (see the module docstring)."""

    def __init__(self, seed: int, batch: int, rank: int, world: int, device: torch.device, stream: int = 0):
        """`stream` separates draws of one batch made for different purposes (e.g. scale_by_std's measurement)."""
        if not 0 <= int(stream) < _HOST_STREAMS:
            raise ValueError(f"GlobalBatchRandom stream {stream}: expected 0..{_HOST_STREAMS - 1}")
        self.rank, self.world, self.device = int(rank), int(world), torch.device(device)
        base = int(seed) * _MIX + int(batch) * _STREAMS + int(stream)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(base % (1 << 63))
        # decisions about host-side data (which captions of a list to drop) are drawn on the host, so a step on a
        # GPU never waits to copy them back
        self.host_generator = torch.Generator()
        self.host_generator.manual_seed((base + _HOST_STREAMS) % (1 << 63))

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.rank::self.world]

    def randn(self, shape: Sequence[int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """N(0, 1) of `shape` (this rank's rows)."""
        full = torch.randn((shape[0] * self.world, *shape[1:]), generator=self.generator, device=self.device,
                           dtype=dtype)
        return self._rows(full)

    def rand(self, n: int) -> torch.Tensor:
        """U[0, 1) for this rank's n rows."""
        return self._rows(torch.rand(n * self.world, generator=self.generator, device=self.device))

    def rand_host(self, n: int) -> torch.Tensor:
        """U[0, 1) for this rank's n rows, drawn on the host (for decisions about host-side data)."""
        return self._rows(torch.rand(n * self.world, generator=self.host_generator))

    def timesteps(self, sampler: Callable[..., torch.Tensor], n: int) -> torch.Tensor:
        """`sampler(n_global, device, generator=...)` (any timestep sampler of ldm.modules.diffusionmodules.loss)."""
        return self._rows(sampler(n * self.world, self.device, generator=self.generator))


def posterior_sample(posterior, rng: Optional[GlobalBatchRandom]) -> torch.Tensor:
    """A sample of a diagonal Gaussian posterior (mean + std x noise), the noise from `rng` when given."""
    if rng is None:
        return posterior.sample()
    return posterior.mean + posterior.std * rng.randn(posterior.mean.shape, dtype=posterior.mean.dtype)
