"""WebDataset tar shards as a Lightning data module, with the parameters of Stable Diffusion 2's
`ldm.data.laion.WebDataModuleFromConfig`.

Each split config names `shards` (brace-expanded, relative to `tar_base`), `image_key` (default jpg),
`image_transforms` (torchvision transforms from config), `shuffle` (buffer size; also shuffles shards),
`postprocess` (a per-sample callable from config, e.g. ldm.data.laion.AddMask) and `repeat` (default: true
for training, as SD2). Shards are split across ranks (`multinode`: webdataset's split_by_node, which reads
RANK / WORLD_SIZE or torch.distributed) and across DataLoader workers (split_by_worker), so every sample is
read by exactly one worker of one rank per pass. Filters, on the sample's `json` metadata and caption:
`min_size` (original_width and original_height), `max_pwatermark` (pwatermark), `p_unsafe_threshold`
(punsafe) and `filter_word_list` (caption words); samples are dropped, and counted, when they fail one.
Images come out HWC in [-1, 1] under `image_key`; captions under `txt`.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections import Counter
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.data.local import DatasetNotFound
from ldm.data.shards import ResumableShards
from ldm.config_keys import report_once
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)


def expand_shards(tar_base: str, shards: str) -> list[str]:
    """Shard paths of `shards` (brace patterns, ::-separated lists) under `tar_base`; local ones must exist."""
    import braceexpand
    pattern = os.path.join(str(tar_base), str(shards))
    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)]
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        found = len(glob.glob(os.path.join(str(tar_base), "*.tar")))
        raise DatasetNotFound(f"WebDataModuleFromConfig: {len(missing)} of {len(urls)} shards are missing (first: "
                              f"{missing[0]}; {found} .tar files in {tar_base}). Set `data.params.tar_base` to the "
                              f"folder of your shards and `shards` in the split config to their names.")
    return urls


def dict_collation(samples: Sequence[Mapping[str, Any]]) -> dict:
    """Batch a list of sample dicts: tensors / arrays stacked, other values kept as lists."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        values = [s[k] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[k] = torch.stack(values)
        elif isinstance(values[0], np.ndarray):
            out[k] = torch.from_numpy(np.stack(values))
        elif isinstance(values[0], (int, float, bool, np.number)):
            out[k] = torch.tensor(values)
        else:
            out[k] = values
    return out


class SampleFilter:
    """The metadata and caption filters of WebDataModuleFromConfig; `dropped` counts why samples were dropped."""

    def __init__(self, image_key: str, min_size: Optional[int] = None, max_pwatermark: float = 1.0,
                 p_unsafe_threshold: Optional[float] = None, filter_word_list: Optional[Sequence[str]] = None):
        self.image_key, self.min_size, self.max_pwatermark = image_key, min_size, max_pwatermark
        self.p_unsafe_threshold = p_unsafe_threshold
        words = [w.strip().lower() for w in (filter_word_list or []) if w.strip()]
        self.words = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.I) if words else None
        self.dropped: Counter = Counter()

    def _drop(self, why: str) -> bool:
        self.dropped[why] += 1
        return False

    def __call__(self, sample: Mapping[str, Any]) -> bool:
        if self.image_key not in sample:
            return self._drop(f"no {self.image_key}")
        meta = sample.get("json") or {}
        if self.min_size is not None:
            w, h = meta.get("original_width", meta.get("width")), meta.get("original_height", meta.get("height"))
            if w is None or h is None or min(w, h) < self.min_size:
                return self._drop("min_size")
        if self.max_pwatermark < 1.0 and float(meta.get("pwatermark") or 0.0) > self.max_pwatermark:
            return self._drop("max_pwatermark")
        if self.p_unsafe_threshold is not None and float(meta.get("punsafe") or 0.0) > self.p_unsafe_threshold:
            return self._drop("p_unsafe_threshold")
        if self.words is not None and self.words.search(str(sample.get("txt", ""))):
            return self._drop("filter_word_list")
        return True


class ImageToModelRange:
    """PIL image -> HWC float tensor in [-1, 1] (after the configured torchvision transforms)."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img) -> torch.Tensor:
        for t in self.transforms:
            img = t(img)
        arr = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, dtype=np.float32)
        return torch.from_numpy(arr / 127.5 - 1.0)


class RawFilter:
    """SampleFilter on a raw tar sample, decoding only its metadata and caption (cheap, for skipped samples too)."""

    def __init__(self, image_key: str, sample_filter: SampleFilter):
        self.image_key, self.sample_filter = image_key, sample_filter

    def __call__(self, raw: Mapping[str, Any]) -> bool:
        sample = {"json": json.loads(raw["json"]) if "json" in raw else {},
                  "txt": raw["txt"].decode("utf-8") if isinstance(raw.get("txt"), bytes) else raw.get("txt", "")}
        if self.image_key in raw:
            sample[self.image_key] = raw[self.image_key]
        return self.sample_filter(sample)


class RawDecoder:
    """A raw tar sample decoded as the streamed pipeline decodes it (images through the transforms, postprocess)."""

    def __init__(self, image_key: str, transforms: Sequence[Callable], postprocess: Optional[Callable]):
        import webdataset as wds
        self.decoder = wds.autodecode.Decoder([wds.autodecode.imagehandler("pil")])
        self.image_key, self.to_image, self.postprocess = image_key, ImageToModelRange(transforms), postprocess

    def __call__(self, raw: Mapping[str, Any]) -> dict:
        sample = self.decoder(dict(raw))
        sample[self.image_key] = self.to_image(sample[self.image_key])
        return self.postprocess(sample) if self.postprocess is not None else sample


class WebDataModuleFromConfig(pl.LightningDataModule):
    """SD2's WebDataset data module over local tar shards (see the module docstring)."""

    def __init__(self, tar_base: str, batch_size: int, train: Optional[Mapping] = None,
                 validation: Optional[Mapping] = None, test: Optional[Mapping] = None, num_workers: int = 4,
                 multinode: bool = True, min_size: Optional[int] = None, max_pwatermark: float = 1.0,
                 filter_word_list: Optional[Sequence[str]] = None, p_unsafe_threshold: Optional[float] = None,
                 **kwargs: Any):
        super().__init__()
        for k in kwargs:
            report_once("WebDataModuleFromConfig: parameter '%s' is not used here", k)
        self.tar_base, self.batch_size, self.num_workers, self.multinode = tar_base, batch_size, num_workers, multinode
        self.filters = dict(min_size=min_size, max_pwatermark=max_pwatermark, p_unsafe_threshold=p_unsafe_threshold,
                            filter_word_list=filter_word_list)
        self.configs = {"train": train, "validation": validation, "test": test}
        self.sample_filters: dict[str, SampleFilter] = {}

    def make_dataset(self, split: str):
        """The webdataset pipeline of one split (shards split by rank and worker, filtered, batched)."""
        import webdataset as wds
        cfg = self.configs[split]
        if cfg is None:
            raise ValueError(f"WebDataModuleFromConfig: no `{split}` config")
        train = split == "train"
        urls = expand_shards(self.tar_base, cfg["shards"])
        image_key = cfg.get("image_key", "jpg")
        transforms = [instantiate_from_config(t, key=f"data.params.{split}.image_transforms")
                      for t in (cfg.get("image_transforms") or [])]
        shuffle = int(cfg.get("shuffle", 0) or 0)
        nodesplitter = wds.shardlists.split_by_node if self.multinode else wds.shardlists.single_node_only
        sample_filter = SampleFilter(image_key, **self.filters)
        self.sample_filters[split] = sample_filter
        postprocess = (instantiate_from_config(cfg["postprocess"], key=f"data.params.{split}.postprocess")
                       if cfg.get("postprocess") is not None else None)
        if cfg.get("resumable", False) and train:
            if shuffle:
                report_once("WebDataModuleFromConfig: `resumable` streams ignore `shuffle` (the shard order is "
                            "permuted per epoch; shuffle samples when writing the shards)")
            return ResumableShards(urls, self.batch_size, decode=RawDecoder(image_key, transforms, postprocess),
                                   collate=dict_collation, keep=RawFilter(image_key, sample_filter),
                                   seed=int(cfg.get("seed", 0)), start=self.batches_done())
        ds = wds.WebDataset(urls, nodesplitter=nodesplitter, shardshuffle=shuffle if shuffle > 0 else False,
                            handler=wds.warn_and_continue, empty_check=False)
        if cfg.get("repeat", train):
            ds = ds.repeat()
        if shuffle > 0:
            ds = ds.shuffle(shuffle)
        ds = ds.decode("pil", handler=wds.warn_and_continue).select(sample_filter)
        ds = ds.map_dict(**{image_key: ImageToModelRange(transforms)}, handler=wds.warn_and_continue)
        if postprocess is not None:
            ds = ds.map(postprocess)
        return ds.batched(self.batch_size, partial=not train, collation_fn=dict_collation)

    def state_dict(self) -> dict:
        """What a resumable stream's position depends on besides the step: saved in the run's checkpoints."""
        from ldm.data.shards import rank_and_world
        cfg = self.configs.get("train") or {}
        if not cfg.get("resumable", False):
            return {}
        return {"num_workers": self.num_workers, "world_size": rank_and_world()[1], "seed": int(cfg.get("seed", 0)),
                "shards": len(expand_shards(self.tar_base, cfg["shards"]))}

    def load_state_dict(self, state: dict) -> None:
        """Refuse to resume a resumable stream with other workers, ranks, seed or shards (the position would be
        another one)."""
        now = self.state_dict()
        changed = {k: (state[k], now[k]) for k in state if k in now and state[k] != now[k]}
        if changed:
            raise ConfigError("WebDataModuleFromConfig: the resumable stream was saved with "
                              + ", ".join(f"{k}={old} (now {new})" for k, (old, new) in changed.items())
                              + "; resume with the same settings, or start a new run from the checkpoint")

    def batches_done(self) -> int:
        """Training batches this rank has consumed: a resumed run's restored count (0 for a new run)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)

    def _loader(self, split: str):
        import webdataset as wds
        return wds.WebLoader(self.make_dataset(split), batch_size=None, shuffle=False, num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("validation")

    def test_dataloader(self):
        return self._loader("test")
