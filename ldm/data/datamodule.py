"""`DataModuleFromConfig`: datasets from `target`/`params` configs wrapped in a Lightning DataModule."""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.buckets import bucket_loader
from ldm.util import ConfigError, instantiate_from_config


class WrappedDataset(Dataset):
    """Wraps an arbitrary object with __len__ and __getitem__ into a torch Dataset."""

    def __init__(self, dataset):
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


def worker_init_fn(_: int) -> None:
    """Give each dataloader worker its own numpy seed."""
    info = torch.utils.data.get_worker_info()
    np.random.seed((torch.initial_seed() + info.id) % 2 ** 32)


def default_num_workers(batch_size: int) -> int:
    """Workers for a loader when the config leaves it unset: none on small machines, else up to half the cores."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(batch_size, cores // 2)


class DataModuleFromConfig(pl.LightningDataModule):
    """CompVis data module: `train`/`validation`/`test`/`predict` dataset configs, one batch size."""

    def __init__(self, batch_size: int, train=None, validation=None, test=None, predict=None, wrap: bool = False,
                 num_workers: Optional[int] = None, shuffle_test_loader: bool = False, use_worker_init_fn: bool = False,
                 shuffle_val_dataloader: bool = False, val_batch_size: Optional[int] = None,
                 persistent_workers: bool = True, bucket_seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = default_num_workers(batch_size) if num_workers is None else num_workers
        self.use_worker_init_fn = use_worker_init_fn
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.dataset_configs = {k: v for k, v in (("train", train), ("validation", validation), ("test", test),
                                                  ("predict", predict)) if v is not None}
        self.shuffle_test_loader, self.shuffle_val_dataloader = shuffle_test_loader, shuffle_val_dataloader
        self.wrap = wrap
        self.bucket_seed = bucket_seed  # the batch order of aspect-ratio buckets (ldm.data.buckets), same on every rank
        self.datasets: dict = {}

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: Optional[str] = None) -> None:
        for k, cfg in self.dataset_configs.items():
            if k not in self.datasets:
                ds = instantiate_from_config(cfg, key=f"data.params.{k}")
                self.datasets[k] = WrappedDataset(ds) if self.wrap else ds

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> Union[DataLoader, list]:
        if name not in self.dataset_configs:  # no such split configured: nothing to validate / test / predict
            if name == "train":
                raise ConfigError("data.params.train is not set: training needs a train dataset config")
            return []
        if name not in self.datasets:
            self.setup()
        ds = self.datasets[name]
        if hasattr(ds, "bucket_of"):  # aspect-ratio buckets: batches of one shape each
            return bucket_loader(ds, batch_size, shuffle, seed=self.bucket_seed, num_workers=self.num_workers,
                                 persistent_workers=self.persistent_workers,
                                 worker_init_fn=worker_init_fn if self.use_worker_init_fn else None)
        iterable = isinstance(ds, IterableDataset)
        return DataLoader(ds, batch_size=batch_size, num_workers=self.num_workers,
                          shuffle=shuffle and not iterable, persistent_workers=self.persistent_workers,
                          worker_init_fn=worker_init_fn if (self.use_worker_init_fn or iterable) else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.shuffle_val_dataloader, self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.shuffle_test_loader, self.val_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False, self.batch_size)
