"""Aspect-ratio buckets (ldm.data.buckets): one shape per batch, every image once per epoch, per rank too."""
from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.buckets import BucketBatchSampler, BucketedImageCaptions, aspect_buckets, nearest_bucket
from ldm.data.datamodule import DataModuleFromConfig


def test_buckets_tile_about_one_area_at_steps_and_bounded_ratios():
    for resolution, step, ratio in ((512, 64, 2.0), (256, 32, 2.0), (1024, 64, 4.0)):
        buckets = aspect_buckets(resolution, step, ratio)
        assert (resolution, resolution) in buckets and len(set(buckets)) == len(buckets)
        for h, w in buckets:
            assert h % step == 0 and w % step == 0
            assert h * w <= resolution ** 2 and h * w > (resolution - step) ** 2 * 0.8
            assert 1 / ratio <= w / h <= ratio
            assert (w, h) in buckets
    buckets = aspect_buckets(512, 64, 2.0)
    assert buckets[nearest_bucket(300, 600, buckets)] == (384, 640)
    assert buckets[nearest_bucket(1000, 1000, buckets)] == (512, 512)
    with pytest.raises(ValueError, match="multiple of step"):
        aspect_buckets(500, 64)


def test_sampler_batches_hold_one_bucket_and_cover_every_index_once_per_epoch():
    rng = np.random.default_rng(0)
    bucket_of = rng.integers(0, 5, size=103).tolist()
    sampler = BucketBatchSampler(bucket_of, batch_size=8, seed=3)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len({bucket_of[i] for i in b}) == 1 and 1 <= len(b) <= 8 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(103))
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    dropped = BucketBatchSampler(bucket_of, batch_size=8, drop_last=True)
    assert all(len(b) == 8 for b in dropped)


def test_sampler_across_ranks_takes_equal_steps_and_covers_every_index():
    bucket_of = [k % 3 for k in range(50)]
    ranks = [list(BucketBatchSampler(bucket_of, 4, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # DDP needs the same number of steps on every rank
    seen = Counter(i for r in ranks for b in r for i in b)
    assert set(seen) == set(range(50))
    padding = sum(seen.values()) - 50
    assert padding < 3 * 4  # only the batches repeated to even out the ranks
    assert not set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))
    with pytest.raises(ValueError, match="rank 3"):
        BucketBatchSampler(bucket_of, 4, num_replicas=3, rank=3)


@pytest.fixture
def mixed_folder(tmp_path):
    sizes = [(60, 120), (120, 60), (90, 90), (64, 128), (100, 100), (128, 70), (80, 80), (50, 110)]
    for k, (h, w) in enumerate(sizes):
        arr = np.full((h, w, 3), 40 + 20 * k, np.uint8)
        arr[h // 2:, w // 2:] = 250  # a mark in one corner shows where the crop was taken
        Image.fromarray(arr).save(tmp_path / f"im{k}.png")
        (tmp_path / f"im{k}.txt").write_text(f"picture {k}")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "broken.txt").write_text("broken")
    return tmp_path, sizes


def test_bucketed_folder_crops_to_each_images_bucket_and_records_the_crop(mixed_folder, caplog):
    root, sizes = mixed_folder
    with caplog.at_level(logging.WARNING):
        ds = BucketedImageCaptions(root, resolution=64, step=16, max_ratio=2.0)
    assert "broken.png" in caplog.text and len(ds) == len(sizes)
    for k in range(len(ds)):
        item = ds[k]
        h, w = ds.sizes[k]
        bh, bw = ds.buckets[ds.bucket_of[k]]
        assert item["image"].shape == (bh, bw, 3)
        assert item["original_size_as_tuple"].tolist() == [h, w]
        assert item["target_size_as_tuple"].tolist() == [bh, bw]
        top, left = item["crop_coords_top_left"].tolist()
        scale = max(bh / h, bw / w)
        assert 0 <= top <= round(h * scale) - bh and 0 <= left <= round(w * scale) - bw
        # the bucket's aspect ratio is the nearest to the image's
        assert ds.bucket_of[k] == min(range(len(ds.buckets)), key=lambda b: abs(
            math.log(ds.buckets[b][1] / ds.buckets[b][0]) - math.log(w / h)))
    assert len(set(ds.bucket_of)) >= 3


def test_data_module_batches_bucketed_data_one_shape_at_a_time(mixed_folder):
    root, sizes = mixed_folder
    dm = DataModuleFromConfig(batch_size=2, num_workers=0, train={
        "target": "ldm.data.buckets.BucketedImageCaptions",
        "params": {"root": str(root), "resolution": 64, "step": 16}})
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen = []
    for batch in loader:
        assert isinstance(batch["image"], torch.Tensor) and batch["image"].dim() == 4
        assert len({tuple(t) for t in batch["target_size_as_tuple"].tolist()}) == 1
        assert tuple(batch["image"].shape[1:3]) == tuple(batch["target_size_as_tuple"][0].tolist())
        seen += batch["caption"]
    assert sorted(seen) == sorted(f"picture {k}" for k in range(len(sizes)))


def test_under_ddp_lightning_keeps_the_bucket_sampler_and_each_epoch_covers_every_image(mixed_folder, tmp_path):
    """2 CPU processes (gloo) through Lightning: every batch has one shape, both ranks take the same number of
    steps, each epoch gives every image to one rank (only the padding repeats), and the order changes by epoch."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root, sizes = mixed_folder
    out = tmp_path / "out"
    out.mkdir()
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(repo / "tests" / "ddp_bucket_worker.py"), str(out), str(root)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    orders = []
    for epoch in range(2):
        steps = [s for r in ranks for s in r if s["epoch"] == epoch]
        for s in steps:
            assert len({tuple(x) for x in s["sizes"]}) == 1 and s["shape"][1:3] == tuple(s["sizes"][0])
        seen = Counter(c for s in steps for c in s["captions"])
        assert set(seen) == {f"picture {k}" for k in range(len(sizes))}
        assert sum(seen.values()) - len(sizes) <= 2  # at most one padded batch of 2
        orders.append([s["captions"] for s in ranks[0] if s["epoch"] == epoch])
    assert orders[0] != orders[1]


def test_cached_latents_refuse_bucketed_data_by_name(mixed_folder, tmp_path):
    from ldm.data.latents import CachedLatents
    from ldm.util import ConfigError
    root, _ = mixed_folder
    with pytest.raises(ConfigError, match="BucketedImageCaptions has aspect-ratio buckets"):
        CachedLatents({"target": "ldm.data.buckets.BucketedImageCaptions", "params": {"root": str(root)}},
                      {"target": "x", "params": {"ckpt_path": str(tmp_path / "ae.ckpt")}}, cache_dir=tmp_path)
