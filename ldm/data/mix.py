"""Several datasets as one (concatenated, each repeated a whole number of times): a fine-tuning set mixed with replayed
data of what the model already knows, e.g. 50 images of a new word with images of the old ones."""
from __future__ import annotations

import bisect
from typing import Mapping, Optional, Sequence

from torch.utils.data import Dataset

from ldm.util import ConfigError, instantiate_from_config


class MixedDatasets(Dataset):
    """The datasets of `datasets` (configs with `target` / `params`) one after another, dataset k `repeats[k]` times.

    Items should carry the same keys (the collate function stacks them)."""

    def __init__(self, datasets: Sequence[Mapping], repeats: Optional[Sequence[int]] = None):
        if not datasets:
            raise ConfigError("MixedDatasets: `datasets` is empty")
        repeats = list(repeats) if repeats is not None else [1] * len(datasets)
        if len(repeats) != len(datasets) or any(int(r) < 1 for r in repeats):
            raise ConfigError(f"MixedDatasets: `repeats` {repeats} must give a count >= 1 for each of the "
                              f"{len(datasets)} datasets")
        self.parts = [instantiate_from_config(cfg, key=f"MixedDatasets.datasets[{k}]") for k, cfg in enumerate(datasets)]
        self.repeats = [int(r) for r in repeats]
        self.ends: list[int] = []
        total = 0
        for part, r in zip(self.parts, self.repeats):
            total += len(part) * r
            self.ends.append(total)

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.ends, i)
        start = self.ends[k - 1] if k else 0
        return self.parts[k][(i - start) % len(self.parts[k])]
