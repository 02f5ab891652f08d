"""Domain FID: the Frechet distance in the feature space of a small classifier trained on the embedded data.

Inception weights do not ship in any wheel, so offline the framework measures distribution quality with a
classifier of its own, trained here on the data the model was trained on (shapes, MNIST-5k). The number is
comparable only between runs that use the same classifier file, so it is reported as "domain_fid" with the
classifier's hash, never as FID. The classifier's labels also give adherence: whether a sample shows the
class it was asked for.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ldm.errors import InputError
from ldm.eval.images import resize_bicubic, to_uint8_rgb
from ldm.files import atomic_path

logger = logging.getLogger(__name__)

FORMAT = "ldm-domain-classifier-1"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class DomainClassifier(nn.Module):
    """A small CNN with one linear head per label key; the pooled penultimate layer gives the features."""

    def __init__(self, heads: Mapping[str, Sequence[Any]], image_size: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.heads_spec = {k: list(v) for k, v in heads.items()}
        self.image_size, self.width, self.feature_dim = int(image_size), int(width), int(feature_dim)
        levels = max(1, int(math.log2(image_size)) - 2)  # downsample to about 4x4
        chans = [width * min(2 ** i, 4) for i in range(levels + 1)]
        layers = [_block(3, chans[0], 1)]
        for i in range(levels):
            layers += [_block(chans[i], chans[i + 1], 2), _block(chans[i + 1], chans[i + 1], 1)]
        self.body = nn.Sequential(*layers)
        self.project = nn.Linear(chans[-1], feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in self.heads_spec.items()})

    def prepare(self, images: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        """Images ([-1, 1] floats or uint8) -> the classifier's float input, via the PNG quantization and resizing."""
        x = resize_bicubic(to_uint8_rgb(images), self.image_size)
        return x.to(self.project.weight.device, torch.float32) / 127.5 - 1.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x).mean(dim=(2, 3))
        return F.silu(self.project(h))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def embed(self, images: Union[torch.Tensor, np.ndarray], batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Features (N, feature_dim) and per-head predicted indices of images, in eval mode."""
        self.eval()
        feats, preds = [], {k: [] for k in self.heads}
        for i in range(0, len(images), batch_size):
            x = self.prepare(images[i:i + batch_size])
            f = self.features(x)
            feats.append(f.cpu())
            for k, head in self.heads.items():
                preds[k].append(head(f).argmax(-1).cpu())
        return {"features": torch.cat(feats), **{f"pred_{k}": torch.cat(v) for k, v in preds.items()}}

    def label_index(self, key: str, values: Sequence[Any]) -> torch.Tensor:
        """Indices of label values in head `key` (a value the head does not know is an error)."""
        vocab = {str(v): i for i, v in enumerate(self.heads_spec[key])}
        try:
            return torch.tensor([vocab[str(v.item() if hasattr(v, "item") else v)] for v in values])
        except KeyError as e:
            raise KeyError(f"label {e.args[0]!r} is not one of head '{key}': {self.heads_spec[key]}") from None

    def metadata(self) -> dict:
        return {"format": FORMAT, "heads": self.heads_spec, "image_size": self.image_size, "width": self.width,
                "feature_dim": self.feature_dim}


@dataclass
class TrainedClassifier:
    classifier: DomainClassifier
    info: dict


def _labels(items: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, list]:
    out = {}
    for k in keys:
        missing = [i for i, it in enumerate(items[:5]) if k not in it]
        if missing:
            raise InputError(f"dataset items have no label key '{k}'; keys: {sorted(items[0])}")
        vals = [it[k] for it in items]
        out[k] = [v.item() if hasattr(v, "item") else v for v in vals]
    return out


def train_domain_classifier(train: Sequence[Mapping[str, Any]], validation: Sequence[Mapping[str, Any]],
                            label_keys: Sequence[str], *, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3,
                            width: int = 32, feature_dim: int = 64, seed: int = 0,
                            dataset: Optional[Mapping[str, Any]] = None) -> TrainedClassifier:
    """Train a DomainClassifier on dataset items (their "image" and label keys), as the data loader yields them.

    Adam with a cosine-decayed learning rate and cross-entropy summed over heads; random +-2 px shifts as the
    only augmentation. `info` records the validation accuracy per head, the steps, time and data settings.
    """
    torch.manual_seed(seed)
    tr_items = [train[i] for i in range(len(train))]
    va_items = [validation[i] for i in range(len(validation))]
    tr_labels, va_labels = _labels(tr_items, label_keys), _labels(va_items, label_keys)
    heads = {k: sorted(set(tr_labels[k]), key=lambda v: (str(type(v)), v)) for k in label_keys}
    x_tr = to_uint8_rgb(np.stack([np.asarray(it["image"]).transpose(2, 0, 1) for it in tr_items]).astype(np.float32))
    x_va = to_uint8_rgb(np.stack([np.asarray(it["image"]).transpose(2, 0, 1) for it in va_items]).astype(np.float32))
    size = x_tr.shape[-1]
    clf = DomainClassifier(heads, size, width, feature_dim)
    y_tr = {k: clf.label_index(k, tr_labels[k]) for k in label_keys}
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    clf.train()
    for step in range(steps):
        idx = torch.randint(len(x_tr), (batch_size,), generator=g)
        x = x_tr[idx].float() / 127.5 - 1.0
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        out = clf(x)
        loss = sum(F.cross_entropy(out[k], y_tr[k][idx]) for k in label_keys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            logger.info("domain classifier step %d/%d loss %.4f", step + 1, steps, loss.detach().item())
    emb = clf.embed(x_va)
    acc = {}
    for k in label_keys:
        known = [i for i, v in enumerate(va_labels[k]) if str(v) in {str(h) for h in heads[k]}]
        want = clf.label_index(k, [va_labels[k][i] for i in known])
        acc[k] = float((emb[f"pred_{k}"][known] == want).float().mean())
    info = {"validation_accuracy": acc, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "train_items": len(tr_items), "validation_items": len(va_items), "train_seconds": round(time.time() - t0, 1),
            "dataset": dict(dataset) if dataset is not None else None}
    return TrainedClassifier(clf.eval(), info)


def save_domain_classifier(trained: TrainedClassifier, path: Union[str, Path]) -> Path:
    """Weights and settings in one safetensors file (settings as JSON metadata)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"classifier": json.dumps(trained.classifier.metadata()), "info": json.dumps(trained.info, default=str)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in trained.classifier.state_dict().items()}, str(tmp), metadata=meta)
    return path


def load_domain_classifier(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> TrainedClassifier:
    """A classifier saved by `save_domain_classifier` (never unpickles)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"domain classifier not found: {path} (train one with scripts/train_domain_classifier.py)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors file: {e}") from e
    spec = json.loads(meta.get("classifier", "{}"))
    if spec.get("format") != FORMAT:
        raise InputError(f"{path}: not a domain classifier (metadata format {spec.get('format')!r}, want {FORMAT!r})")
    clf = DomainClassifier(spec["heads"], spec["image_size"], spec["width"], spec["feature_dim"])
    clf.load_state_dict(state)
    return TrainedClassifier(clf.to(device).eval(), json.loads(meta.get("info", "{}")))
