"""Distribution metrics on features: Frechet distance (FID), KID, Inception Score, precision/recall.

The Frechet distance is computed here, in float64, by a symmetric eigen-decomposition, since
tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) and the right-hand side is a symmetric PSD matrix. This avoids
`scipy.linalg.sqrtm`, whose results some SciPy versions got wrong (complex parts, inaccurate blocks), and
float32 means (torch-fidelity averages float32 features in float32). KID, IS and precision/recall are
torch-fidelity's estimators, called on float64 features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from ldm.errors import InputError

ArrayLike = Union[np.ndarray, torch.Tensor]


def _float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"features must be (N, D), got shape {x.shape}")
    return x


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set (float64), the sufficient statistics of the Frechet distance."""
    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features: ArrayLike) -> "GaussianStats":
        f = _float64(features)
        if f.shape[0] < 2:
            raise InputError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), f.shape[0])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Frechet distance of two Gaussians, ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017)."""
    if a.mu.shape != b.mu.shape:
        raise InputError(f"feature sizes differ: {a.mu.shape[0]} vs {b.mu.shape[0]} (different extractors?)")
    diff = a.mu - b.mu
    root = _psd_sqrt(a.sigma)
    cross = np.trace(_psd_sqrt(root @ b.sigma @ root))
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * cross)


def kernel_inception_distance(fake: ArrayLike, real: ArrayLike, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel over random subsets; (mean, std).

    The subset size is capped at the smaller set's size.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    f1, f2 = torch.from_numpy(_float64(fake)), torch.from_numpy(_float64(real))
    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise InputError("KID needs at least 2 samples in each set")
    out = kid_features_to_metric(f1, f2, kid_subsets=subsets, kid_subset_size=size, kid_kernel="poly",
                                 kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                 rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def inception_score(logits: ArrayLike, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp E[KL(p(y|x) || p(y))] over `splits` splits; (mean, std)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    lg = torch.from_numpy(_float64(logits))
    if len(lg) < splits:
        raise InputError(f"Inception Score with {splits} splits needs at least {splits} samples, got {len(lg)}")
    out = isc_features_to_metric(lg, splits=splits, shuffle=True, rng_seed=seed)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(fake: ArrayLike, real: ArrayLike, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls; (precision, recall)."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full
    f1, f2 = torch.from_numpy(_float64(fake)), torch.from_numpy(_float64(real))
    if min(len(f1), len(f2)) <= k:
        raise InputError(f"precision/recall with k={k} needs more than {k} samples in each set")
    return calculate_precision_recall_full(f1, f2, neighborhood=k, batch_size=10_000)

