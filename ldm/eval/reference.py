"""Reference features of a dataset, computed once with the training data's preprocessing and cached with settings.

The reference images are the dataset items exactly as the training data loader yields them (`item["image"]`
from the config's dataset class, [-1, 1] HWC), quantized like saved samples. This is the preprocessing the
original code's users got wrong when they reproduced FID: the reference set must be resized/cropped as the
training data was, not read from the raw files. A cache file holds the features, their float64 statistics and
the settings (dataset config, number of images, extractor and its weights' hash, resize); a cache whose
settings differ is recomputed, never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ldm.errors import InputError
from ldm.eval.features import FeatureExtractor
from ldm.eval.images import to_uint8_rgb
from ldm.eval.statistics import GaussianStats
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)

CACHED_LATENTS = "ldm.data.latents.CachedLatents"
SUBSET_SEED = 0  # which items a reference subset of n holds (recorded with the cached features)


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def dataset_config(cfg: DictConfig, spec: str, overrides: Sequence[str] = ()) -> dict:
    """A dataset's target/params from a key of `cfg` or a YAML file, with KEY=VALUE overrides; cached latents are
    unwrapped to the image dataset they encode (evaluation and the domain classifier read images)."""
    if spec.endswith((".yaml", ".yml")):
        if not Path(spec).is_file():
            raise ConfigError(f"{spec}: file not found")
        ref = OmegaConf.load(spec)
    else:
        ref = OmegaConf.select(cfg, spec)
        if ref is None:
            raise ConfigError(f"{spec}: the config has no such key")
    if ref.get("target") == CACHED_LATENTS:  # latents are what the LDM reads; the images are the inner dataset
        ref = ref.params.dataset
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"dataset overrides take KEY=VALUE, got {bad}")
        ref = OmegaConf.merge(ref, OmegaConf.from_dotlist(list(overrides)))
    if "target" not in ref:
        raise ConfigError(f"{spec}: no 'target' in {OmegaConf.to_yaml(ref)}")
    return OmegaConf.to_container(ref, resolve=True)


def subset_indices(total: int, n: Optional[int], seed: int = 0) -> list[int]:
    """All indices when n is None or covers the dataset, else a seeded random subset of n (sorted).

    Never the first n: datasets are often sorted by class (MNIST-5k is), and a prefix is then not a sample.
    """
    if n is None or n >= total:
        return list(range(total))
    return sorted(np.random.default_rng(seed).permutation(total)[:n].tolist())


def dataset_images(dataset, indices: Sequence[int], batch_size: int = 256):
    """uint8 (B, 3, H, W) batches of the items' "image" at `indices`."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        if "image" not in items[0]:
            raise KeyError(f"{type(dataset).__name__} items have no 'image' key; keys: {sorted(items[0])}")
        arr = np.stack([np.asarray(it["image"], dtype=np.float32).transpose(2, 0, 1) for it in items])
        yield to_uint8_rgb(torch.from_numpy(arr))


class ReferenceFeatures:
    """Features of a reference dataset and their Gaussian statistics."""

    def __init__(self, features: torch.Tensor, settings: dict):
        self.features, self.settings = features, settings
        self.stats = GaussianStats.of(features)

    def __len__(self) -> int:
        return len(self.features)


def settings_key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_features(dataset_config: Mapping[str, Any], extractor: FeatureExtractor, *, n: Optional[int] = None,
                       cache_dir: Optional[Union[str, Path]] = None, batch_size: int = 256) -> ReferenceFeatures:
    """Features of `n` items (a seeded random subset; all when None) of the dataset a `target`/`params` config
    builds, cached under `cache_dir`."""
    dataset_config = _plain(dataset_config)
    if not isinstance(dataset_config, Mapping) or "target" not in dataset_config:
        raise InputError(f"reference dataset config needs a 'target' (and 'params'), got {dataset_config!r}")
    settings = {"dataset": dataset_config, "n": n, "subset_seed": SUBSET_SEED, "extractor": extractor.settings}
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{extractor.name}-{settings_key(settings)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                stored = json.loads(str(z["settings"]))
                if stored == json.loads(json.dumps(settings, default=str)):
                    logger.info("reference features from cache %s", path)
                    return ReferenceFeatures(torch.from_numpy(z["features"]).double(), stored)
            logger.warning("reference cache %s was made with other settings; recomputing", path)
    dataset = instantiate_from_config(dataset_config)
    if n is not None and len(dataset) < n:
        logger.warning("reference dataset %s has %d items, fewer than the %d asked for", dataset_config["target"],
                       len(dataset), n)
    indices = subset_indices(len(dataset), n, SUBSET_SEED)
    feats = []
    with tqdm(total=len(indices), desc="reference features", unit="img") as bar:
        for batch in dataset_images(dataset, indices, batch_size):
            feats.append(extractor(batch)["features"].double())
            bar.update(len(batch))
    ref = ReferenceFeatures(torch.cat(feats), json.loads(json.dumps(settings, default=str)))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.npz")
        np.savez(tmp, features=ref.features.float().numpy(), mu=ref.stats.mu, sigma=ref.stats.sigma,
                 settings=np.array(json.dumps(ref.settings, sort_keys=True)))
        tmp.replace(path)
        logger.info("reference features of %d images cached in %s", len(ref), path)
    return ref
