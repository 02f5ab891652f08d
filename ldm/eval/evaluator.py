"""One object that computes the chosen metrics of a set of samples against a reference dataset.

Metric names:
- `fid`, `kid`, `isc`, `prc`: Inception-v3 (TF-FID weights) FID, KID, Inception Score, precision/recall;
- `domain_fid`, `domain_kid`, `domain_prc`: the same estimators in the domain classifier's feature space,
  reported under these names only;
- `clip`: CLIP score of images against their prompts;
- `adherence`: the shapes evaluator's all-four-attributes rate for shapes captions (per attribute too), or
  the domain classifier's class accuracy for class-conditional samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ldm.errors import InputError
from ldm.eval.statistics import (GaussianStats, frechet_distance, inception_score, kernel_inception_distance,
                                 precision_recall)

INCEPTION_METRICS = ("fid", "kid", "isc", "prc")
DOMAIN_METRICS = ("domain_fid", "domain_kid", "domain_prc")
METRICS = INCEPTION_METRICS + DOMAIN_METRICS + ("clip", "adherence")


class Evaluator:
    """Builds the feature extractors the chosen metrics need (lazily finding their weights) and scores samples."""

    def __init__(self, metrics: Sequence[str], *, reference: Optional[Mapping[str, Any]] = None,
                 n_reference: Optional[int] = None, cache_dir: Optional[Union[str, Path]] = None,
                 inception_weights: Optional[Union[str, Path]] = None, resize: str = "pil_bicubic",
                 clip_model: str = "openai/clip-vit-large-patch14", domain_classifier: Optional[Union[str, Path]] = None,
                 device: Union[str, torch.device] = "cpu", kid_subset_size: int = 1000, prc_k: int = 3):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise InputError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
        self.metrics = list(metrics)
        needs_ref = [m for m in self.metrics if m in INCEPTION_METRICS + DOMAIN_METRICS and m != "isc"]
        if needs_ref and reference is None:
            raise InputError(f"metrics {needs_ref} compare against a reference dataset: give its config")
        wants_domain = any(m in DOMAIN_METRICS for m in self.metrics)
        if wants_domain and domain_classifier is None:
            raise InputError(f"metrics {[m for m in self.metrics if m in DOMAIN_METRICS]} need a domain classifier "
                             f"file (--domain_classifier; train one with scripts/train_domain_classifier.py)")
        self.reference_config, self.n_reference, self.cache_dir = reference, n_reference, cache_dir
        self.kid_subset_size, self.prc_k = kid_subset_size, prc_k
        self.extractors: dict[str, Any] = {}
        if any(m in INCEPTION_METRICS for m in self.metrics):
            from ldm.eval.features import InceptionFeatures
            self.extractors["inception"] = InceptionFeatures(inception_weights, resize=resize, device=device)
        if wants_domain or ("adherence" in self.metrics and domain_classifier is not None):
            from ldm.eval.features import DomainFeatures
            self.extractors["domain"] = DomainFeatures(domain_classifier, device=device)
        self.clip = None
        if "clip" in self.metrics:
            from ldm.eval.clip_score import CLIPScorer
            self.clip = CLIPScorer(clip_model, device=device)
        self._references: dict[str, Any] = {}

    def reference(self, name: str):
        """Reference features for extractor `name` (computed once, cached on disk when a cache dir is set)."""
        if name not in self._references:
            from ldm.eval.reference import reference_features
            self._references[name] = reference_features(self.reference_config, self.extractors[name],
                                                        n=self.n_reference, cache_dir=self.cache_dir)
        return self._references[name]

    def settings(self) -> dict:
        out: dict[str, Any] = {"metrics": self.metrics, "reference": self.reference_config,
                               "n_reference": self.n_reference, "kid_subset_size": self.kid_subset_size,
                               "prc_k": self.prc_k}
        for name, ex in self.extractors.items():
            out[name] = ex.settings
        if self.clip is not None:
            out["clip"] = self.clip.settings
        return out

    def _distribution(self, prefix: str, feats: torch.Tensor, logits: Optional[torch.Tensor], name: str) -> dict:
        out: dict[str, float] = {}
        chosen = {m[len(prefix):] for m in self.metrics if m.startswith(prefix)} & set(INCEPTION_METRICS)
        ref = self.reference(name) if any(m != "isc" for m in chosen) else None
        if "fid" in chosen:
            out[prefix + "fid"] = frechet_distance(GaussianStats.of(feats), ref.stats)
        if "kid" in chosen:
            out[prefix + "kid"], out[prefix + "kid_std"] = kernel_inception_distance(
                feats, ref.features, subset_size=self.kid_subset_size)
        if "prc" in chosen:
            out[prefix + "precision"], out[prefix + "recall"] = precision_recall(feats, ref.features, k=self.prc_k)
        if "isc" in chosen and logits is not None:
            out["isc"], out["isc_std"] = inception_score(logits, splits=min(10, len(logits)))
        return out

    def __call__(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                 labels: Optional[Sequence[Any]] = None) -> dict[str, float]:
        """Metrics of uint8 (N, 3, H, W) samples; `prompts` for CLIP / shapes adherence, `labels` for class accuracy."""
        out: dict[str, float] = {"n": len(images)}
        if "inception" in self.extractors:
            r = self.extractors["inception"](images)
            out.update(self._distribution("", r["features"], r["logits"], "inception"))
        domain = self.extractors["domain"](images) if "domain" in self.extractors else None
        if domain is not None and any(m in DOMAIN_METRICS for m in self.metrics):
            out.update(self._distribution("domain_", domain["features"], None, "domain"))
        if self.clip is not None:
            if prompts is None:
                raise InputError("the CLIP score needs the prompts the samples were made from")
            out["clip"] = self.clip(images, prompts)
        if "adherence" in self.metrics:
            out.update(self.adherence(images, prompts, labels, domain))
        return out

    def adherence(self, images: torch.Tensor, prompts, labels, domain) -> dict[str, float]:
        if labels is not None:
            if domain is None:
                raise InputError("class adherence needs a domain classifier (--domain_classifier)")
            clf = self.extractors["domain"].classifier
            key = "class_label" if "class_label" in clf.heads_spec else next(iter(clf.heads_spec))
            want = clf.label_index(key, list(labels))
            return {"class_accuracy": float((domain[f"pred_{key}"] == want).float().mean())}
        if prompts is not None:
            from ldm.eval.shapes_eval import score
            s = score(images.permute(0, 2, 3, 1).numpy(), prompts)
            return {"adherence": s["all"], **{f"adherence_{k}": s[k] for k in ("shape", "color", "size", "position")}}
        raise InputError("adherence needs prompts (shapes captions) or class labels")
