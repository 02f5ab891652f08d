"""Latent caching: a dataset's images encoded once by the frozen first stage, so LDM steps skip the encoder."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.modules.model_inputs import LATENT_KEY
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)

_FORMAT = 1


def _fingerprint(dataset_config: Mapping, first_stage_config: Mapping, image_key: str) -> str:
    """Hash of what the cache depends on: both configs and the bytes of the first stage's checkpoint."""
    h = hashlib.sha256(json.dumps({"format": _FORMAT, "dataset": dataset_config, "key": image_key,
                                   "first_stage": first_stage_config}, sort_keys=True, default=str).encode())
    ckpt = first_stage_config.get("params", {}).get("ckpt_path")
    if ckpt:
        with open(ckpt, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _plain_config(cfg: Mapping) -> dict:
    """A plain dict of a config node, its interpolations (e.g. `${model.params.first_stage_config}`) resolved."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def _to_chw(x: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if x.dim() == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2).float()


def _plain(v: Any) -> Any:
    """Item values in a form a weights-only load accepts (numpy scalars and arrays become Python / tensors)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    return v


@torch.no_grad()
def encode_dataset(dataset: Dataset, first_stage: torch.nn.Module, image_key: str = "image",
                   batch_size: int = 256) -> tuple[torch.Tensor, list[dict]]:
    """First-stage encodings of every item's `image_key` (posterior moments for KL, pre-quantisation h for VQ)."""
    moments, rest = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        for i, item in enumerate(items):
            if image_key not in item:
                raise KeyError(f"CachedLatents: item {start + i} has no key '{image_key}' (image_key); "
                               f"keys: {sorted(item)}")
        clips = np.ndim(items[0][image_key]) == 4  # (T, H, W, C) per item: a clip, encoded frame by frame
        x = torch.cat([_to_chw(it[image_key]) for it in items])
        enc = first_stage.encode(x)
        m = getattr(enc, "parameters", enc).float()  # KL posterior: [mean, logvar] on channels
        if clips:  # (N T, C', h, w) -> (N, C', T, h, w), as the video model's latents
            m = m.reshape(len(items), -1, *m.shape[1:]).transpose(1, 2)
        moments.append(m.contiguous())
        rest.extend({k: _plain(v) for k, v in it.items() if k != image_key} for it in items)
    return torch.cat(moments), rest


class CachedLatents(Dataset):
    """`dataset` with its images replaced by the frozen first stage's encodings, computed once and kept on disk.

    Items carry `latent_moments` (C', h, w; (C', T, h, w) for clips) instead of `image_key`, plus every other key
    of the item (captions, labels). LatentDiffusion samples the posterior from them at each step, as it would after
    encoding. The cache file is reused while the dataset config, the first-stage config and its
    checkpoint bytes are unchanged, and rebuilt otherwise. Per-item randomness of the dataset (crops,
    flips) is frozen at caching time, so use it for deterministic datasets or accept fixed augmentations.
    """

    def __init__(self, dataset: Mapping, first_stage_config: Mapping, cache_dir: Union[str, Path] = "cache/latents",
                 image_key: str = "image", batch_size: int = 256, keep_images: bool = False):
        ds_cfg, fs_cfg = _plain_config(dataset), _plain_config(first_stage_config)
        if not fs_cfg.get("params", {}).get("ckpt_path"):
            raise ValueError("CachedLatents: first_stage_config.params.ckpt_path is not set; latents of an untrained "
                             "first stage are meaningless")
        self.image_key = image_key
        self.dataset = instantiate_from_config(ds_cfg, key="CachedLatents.dataset")
        if hasattr(self.dataset, "bucket_of"):
            raise ConfigError(f"CachedLatents.dataset: {ds_cfg.get('target')} has aspect-ratio buckets of different "
                              f"shapes, which one latent cache cannot hold; train on it directly (no CachedLatents)")
        fp = _fingerprint(ds_cfg, fs_cfg, image_key)
        path = Path(cache_dir) / f"latents-{fp}.pt"
        if path.exists():
            data = torch.load(path, map_location="cpu", weights_only=True)
            logger.info("CachedLatents: loaded %d latents from %s", len(data["moments"]), path)
        else:
            t0 = time.time()
            first_stage = instantiate_from_config(fs_cfg, key="CachedLatents.first_stage_config").eval()
            moments, rest = encode_dataset(self.dataset, first_stage, image_key, batch_size)
            data = {"moments": moments, "rest": rest}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # DDP ranks may encode at once; the last rename wins
            torch.save(data, tmp)
            tmp.replace(path)
            logger.info("CachedLatents: encoded %d items in %.1f s -> %s", len(moments), time.time() - t0, path)
        if len(data["moments"]) != len(self.dataset):
            raise ValueError(f"CachedLatents: cache {path} holds {len(data['moments'])} items, the dataset "
                             f"{len(self.dataset)}; delete the file to rebuild it")
        self.path, self.moments, self.rest = path, data["moments"], data["rest"]
        self.keep_images = keep_images

    def __len__(self) -> int:
        return len(self.moments)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.rest[i])
        item[LATENT_KEY] = self.moments[i]
        if self.keep_images:
            item[self.image_key] = self.dataset[i][self.image_key]
        return item
