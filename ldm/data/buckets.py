"""Aspect-ratio buckets for text-to-image training (NovelAI's bucketing, as SDXL and the SD training scripts use it).

Images are not all cropped to one square: each goes to the bucket, a (height, width) of about the same area, whose
aspect ratio is nearest its own, and is resized to cover that bucket and cropped to it. A batch holds one bucket,
so its tensors stack. The crop is recorded with SDXL's size conditioning keys (`original_size_as_tuple`,
`crop_coords_top_left`, `target_size_as_tuple`), for models that condition on them.

    data.params.train:
      target: ldm.data.buckets.BucketedImageCaptions
      params: {root: my_images/, resolution: 512, step: 64, max_ratio: 2.0}

`DataModuleFromConfig` sees the dataset's `buckets` and batches with `BucketBatchSampler`: every image once per
epoch, shuffled per epoch, and across DDP ranks each rank takes its own batches.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from ldm.data.folder import IMAGE_EXTENSIONS, MAX_SKIPS, ImageCaptionFolder
from ldm.data.transforms import to_model_range
from ldm.files import read_rgb8

logger = logging.getLogger(__name__)


def aspect_buckets(resolution: int = 512, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) pairs, both multiples of `step`, of area at most resolution^2 and as close to it as the
    step allows, with aspect ratios from 1 / max_ratio to max_ratio; sorted from tallest to widest."""
    if resolution % step or resolution < step:
        raise ValueError(f"resolution {resolution} must be a positive multiple of step {step}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    out = set()
    for width in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        height = min(area // width // step * step, int(resolution * math.sqrt(max_ratio)) // step * step)
        if height >= step and 1 / max_ratio <= width / height <= max_ratio:
            out.add((height, width))
            out.add((width, height))
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio) to height x width."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda k: abs(math.log(buckets[k][1] / buckets[k][0]) - target))


class BucketBatchSampler(DistributedSampler):
    """Batches of indices from one bucket each. An epoch yields every index once: each bucket's indices are split
    into batches (its last batch may be smaller, unless `drop_last`), and the batches are shuffled by (seed, epoch).

    With `num_replicas` ranks, rank r takes batches r, r + N, ...; the batch list is first extended by repeating
    its first batches to a multiple of N, so every rank takes the same number of steps (DDP needs that).

    It yields whole batches, for a DataLoader with `batch_size=None` over `CollatedBatches`. It is a
    DistributedSampler so that Lightning, which replaces other samplers with its own under DDP, keeps it (and
    calls its `set_epoch`); it splits the work across ranks itself."""

    def __init__(self, bucket_of: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.bucket_of = np.asarray(bucket_of)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for bucket in np.unique(self.bucket_of):
            members = np.flatnonzero(self.bucket_of == bucket)
            if self.shuffle:
                members = rng.permutation(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append([int(i) for i in batch])
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        if self.num_replicas > 1 and batches:
            short = -len(batches) % self.num_replicas
            batches += [batches[k % len(batches)] for k in range(short)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._all_batches()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return len(self._all_batches()[self.rank::self.num_replicas])


class CollatedBatches(Dataset):
    """`dataset` indexed by a list of indices: the collated batch of those items (for BucketBatchSampler)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Sequence[int]) -> dict:
        return default_collate([self.dataset[i] for i in indices])


def bucket_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                  **loader_kwargs) -> DataLoader:
    """A DataLoader of single-bucket batches of `dataset` (which has `bucket_of`), split across the DDP ranks of the
    initialised process group, if any."""
    world, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    sampler = BucketBatchSampler(dataset.bucket_of, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                 num_replicas=world, rank=rank)
    return DataLoader(CollatedBatches(dataset), sampler=sampler, batch_size=None, **loader_kwargs)


class BucketedImageCaptions(ImageCaptionFolder):
    """ImageCaptionFolder with aspect-ratio buckets: each image is resized to cover its bucket (`aspect_buckets`)
    and cropped to it (center, or random with `crop: random`); items carry the size conditioning of the crop."""

    def __init__(self, root: Union[str, Path], resolution: int = 512, step: int = 64, max_ratio: float = 2.0,
                 crop: str = "center", flip: bool = False, manifest: Optional[Union[str, Path]] = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, seed: Optional[int] = None):
        if crop not in ("center", "random"):
            raise ValueError(f"BucketedImageCaptions: crop must be 'center' or 'random', got '{crop}'")
        super().__init__(root, size=None, crop=crop, flip=flip, manifest=manifest, extensions=extensions, seed=seed)
        self.buckets = aspect_buckets(resolution, step, max_ratio)
        keep, sizes = [], []
        for k, path in enumerate(self.files):
            try:
                with Image.open(path) as im:  # the header only
                    width, height = im.size
            except Exception as e:  # unreadable: logged and left out of every bucket
                logger.warning("BucketedImageCaptions: skipping unreadable image %s: %s: %s", path, type(e).__name__, e)
                continue
            keep.append(k)
            sizes.append((height, width))
        if not keep:
            raise FileNotFoundError(f"BucketedImageCaptions: no readable images under {root}")
        self.files = [self.files[k] for k in keep]
        self.captions = [self.captions[k] for k in keep]
        self.metadata = [self.metadata[k] for k in keep]
        self.sizes = sizes
        self.bucket_of = [nearest_bucket(h, w, self.buckets) for h, w in sizes]
        self.members: dict[int, list[int]] = {}  # bucket -> its images; image -> its place there
        self.place: list[int] = []
        for k, b in enumerate(self.bucket_of):
            self.place.append(len(self.members.setdefault(b, [])))
            self.members[b].append(k)
        counts = np.bincount(self.bucket_of, minlength=len(self.buckets))
        logger.info("BucketedImageCaptions: %d images in %d of %d buckets", len(self.files), int((counts > 0).sum()),
                    len(self.buckets))

    def _load_into(self, i: int) -> dict:
        """Image i resized to cover its bucket and cropped to it, with the size conditioning of the crop."""
        img = read_rgb8(self.files[i])
        bh, bw = self.buckets[self.bucket_of[i]]
        w, h = img.size
        scale = max(bh / h, bw / w)
        nh, nw = max(bh, round(h * scale)), max(bw, round(w * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        rng = self._rng(i)
        if self.crop == "random":
            top, left = int(rng.integers(0, nh - bh + 1)), int(rng.integers(0, nw - bw + 1))
        else:
            top, left = (nh - bh) // 2, (nw - bw) // 2
        arr = np.asarray(img.crop((left, top, left + bw, top + bh)), dtype=np.uint8)
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return {"image": to_model_range(arr), "caption": self.captions[i], "file_path_": str(self.files[i]),
                "original_size_as_tuple": torch.tensor([h, w]), "crop_coords_top_left": torch.tensor([top, left]),
                "target_size_as_tuple": torch.tensor([bh, bw])}

    def __getitem__(self, i: int) -> dict:
        """Item i; an image that fails to read is logged and replaced by the next readable one of its bucket (so a
        batch keeps one shape)."""
        same, start = self.members[self.bucket_of[i]], self.place[i]
        for k in range(min(MAX_SKIPS, len(same))):
            j = same[(start + k) % len(same)]
            if j in self.bad:
                continue
            try:
                return self._load_into(j)
            except Exception as e:
                self.bad.add(j)
                logger.warning("skipping unreadable image %s: %s: %s", self.files[j], type(e).__name__, e)
        raise RuntimeError(f"no readable image in bucket {self.buckets[self.bucket_of[i]]} around {self.files[i]}")
