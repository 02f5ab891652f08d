"""Tar shards streamed in an order a resumed run continues exactly (`resumable: true` in a WebDataModuleFromConfig
split config).

Each epoch the shard list is permuted by (seed, epoch); rank r of R takes shards r, r + R, ... of it, and worker w of
that rank's W DataLoader workers takes every W-th of those. A worker reads its shards one after another, sample by
sample, and cuts the stream into batches; epochs follow each other without a gap, so every sample is read once per
epoch by exactly one worker of one rank. The DataLoader hands out the workers' batches in turn (batch j of a rank
comes from worker j mod W), so after S batches worker w has produced the batches j < S with j mod W = w. A run
resumed after S batches skips exactly those, reading the skipped samples without decoding them; its DataLoader
starts again at worker 0, so worker i takes the part of the stopped run's worker (i + S) mod W, and the batches come
out in the stopped run's order: no sample repeated, none skipped.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ldm.errors import InputError


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without an initialised process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_shards(urls: Sequence[str], seed: int, epoch: int, rank: int, world: int, worker: int,
                  workers: int) -> list[str]:
    """The shards worker `worker` of rank `rank` reads in `epoch`, in order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(urls))
    return [urls[k] for k in order[rank::world][worker::workers]]


def batches_done_by(worker: int, workers: int, batches: int) -> int:
    """How many of a rank's first `batches` batches worker `worker` of `workers` produced (they take turns)."""
    return len(range(worker, batches, workers))


class ResumableShards(IterableDataset):
    """An endless stream of batches from tar shards, in the order of the module docstring; `start` batches of this
    rank are skipped (a resumed run's step). `keep(raw)` says whether a sample is used (cheap: it runs on skipped
    samples too, so that a resumed run skips what the stopped one used); `decode(raw)` makes the item;
    `collate(items)` the batch. The rank and world size are read when the dataset is made (in the main process)."""

    def __init__(self, urls: Sequence[str], batch_size: int, decode: Callable[[dict], Any],
                 collate: Callable[[list], Any], keep: Optional[Callable[[dict], bool]] = None, seed: int = 0,
                 start: int = 0, rank: Optional[int] = None, world: Optional[int] = None):
        if not urls:
            raise InputError("ResumableShards: no shards")
        self.urls, self.batch_size, self.decode, self.collate = list(urls), int(batch_size), decode, collate
        self.keep = keep or (lambda raw: True)
        self.seed, self.start = int(seed), int(start)
        here = rank_and_world()
        self.rank, self.world = (here[0] if rank is None else rank), (here[1] if world is None else world)

    def _samples(self, shards: Sequence[str]) -> Iterator[dict]:
        import webdataset as wds
        yield from wds.tarfile_samples([{"url": u} for u in shards])

    def __iter__(self) -> Iterator[Any]:
        rank, world = self.rank, self.world
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        # the DataLoader takes batches from its workers in turn, starting at worker 0: after S batches the next is
        # due from worker S mod W of the stopped run, so this worker plays that one's part, and so on round the ring
        worker = ((info.id if info is not None else 0) + self.start) % workers
        if len(self.urls) < world * workers:
            raise InputError(f"ResumableShards: {len(self.urls)} shards for {world} rank(s) x {workers} worker(s): "
                             f"each worker needs a shard of its own; write more, smaller shards "
                             f"(scripts/make_shards.py --maxcount) or use fewer workers")
        skip = batches_done_by(worker, workers, self.start) * self.batch_size  # kept samples, not decoded
        batch: list = []
        epoch = 0
        while True:
            for raw in self._samples(worker_shards(self.urls, self.seed, epoch, rank, world, worker, workers)):
                if not self.keep(raw):
                    continue
                if skip:
                    skip -= 1
                    continue
                batch.append(self.decode(raw))
                if len(batch) == self.batch_size:
                    yield self.collate(batch)
                    batch = []
            epoch += 1
