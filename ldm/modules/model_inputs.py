"""What the diffusion models read besides the noisy latent: the cached-latent batch key and the encode policy, what
a model kind is conditioned on, and the inputs of inpainting models (mask conventions, the masked image, masks at
latent size).

Datasets (`ldm.data`), models (`ldm.models`) and the tasks all import these from here, so that models never
import datasets. Two inpainting input conventions exist in published models and both are kept:
- `sd` (Stable Diffusion 2 `LatentInpaintDiffusion`, `ldm.data.laion.AddMask`): mask in {0, 1}, the
  masked image is the image with the hole set to 0 (mid-gray in [-1, 1]).
- `compvis` (the paper's LDM inpainting model, CompVis `scripts/inpaint.py`): mask in {-1, 1}, the
  hole set to -1 (black).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

ArrayLike = Union[np.ndarray, torch.Tensor]

LATENT_KEY = "latent_moments"  # batch key of a cached first-stage encoding, read by LatentDiffusion in place of the image
PRIOR_PREFIX = "prior_"  # DreamBooth: batch keys of the class items paired with the instance items (prior_image, ...)
PRIOR_FLAG = "is_prior_"  # the merged batch's marker of its class items


class Encoding(str, Enum):
    """How an image's first-stage encoding becomes latents: a posterior sample (training, as CompVis trains) or the
    posterior's mode (tasks on a given image: img2img, inpainting; deterministic). A VQ or identity first stage
    returns a tensor, which both policies take as it is."""
    SAMPLE = "sample"
    MODE = "mode"


def unscaled_latents(encoder_posterior, encoding: Encoding = Encoding.SAMPLE) -> torch.Tensor:
    """The first stage's latents under `encoding`: for a KL autoencoder a posterior sample or its mode, for any
    other first stage the tensor itself."""
    if isinstance(encoder_posterior, DiagonalGaussianDistribution):
        return encoder_posterior.mode() if Encoding(encoding) is Encoding.MODE else encoder_posterior.sample()
    if isinstance(encoder_posterior, torch.Tensor):
        return encoder_posterior
    raise TypeError(f"encoder output of type '{type(encoder_posterior).__name__}' not understood")


class ConditionInput(str, Enum):
    """What a model kind's `conditioning()` reads (the model answers with the set it needs)."""
    PROMPTS = "prompts"          # text, through cross-attention
    LABELS = "labels"            # class labels (a conditioner with n_classes)
    LOW_RES = "low_res"          # a low-resolution image concatenated to the latent (super-resolution)
    NOISE_LEVEL = "noise_level"  # the augmentation level of a noise-augmented upscaler
    MASK = "mask"                # an image and the mask of its pixels to fill (inpainting models)
    RAW = "raw"                  # anything else the conditioner takes as it is (layouts, segmentation maps)


@dataclass
class ConditionValues:
    """What one `conditioning()` call was given; a model kind reads the inputs its `condition_inputs` name.

    `image` (B, C, H, W in [-1, 1]) with `mask` (B, 1, H, W; 1 = fill) for inpainting, `low_res` for
    super-resolution, `raw` for a conditioner that takes its input as it is (a mapping of batch keys for a
    conditioner of several embedders), `generator` for an upscaler's augmentation noise.
    """
    prompts: Optional[Sequence[str]] = None
    labels: Any = None
    image: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    low_res: Optional[torch.Tensor] = None
    noise_level: Any = None
    raw: Any = None
    generator: Any = None

    def given(self, what: ConditionInput) -> Any:
        """The value that fills input `what` (an inpainting model's MASK input is the image to fill)."""
        return {ConditionInput.PROMPTS: self.prompts, ConditionInput.LABELS: self.labels,
                ConditionInput.RAW: self.raw, ConditionInput.NOISE_LEVEL: self.noise_level,
                ConditionInput.LOW_RES: self.low_res if self.low_res is not None else self.image,
                ConditionInput.MASK: self.image}[ConditionInput(what)]


class InpaintMode(str, Enum):
    """How a model inpaints: SD2-style inpainting model, the paper's concat model, or known-region replacement."""
    MODEL = "model"        # LatentInpaintDiffusion: mask and masked-image latent concatenated to the UNet input
    PAPER = "paper"        # LatentDiffusion with cond_stage_key masked_image (CompVis inpainting_big)
    REPLACE = "replace"    # any LDM: the known latents replace the sample's known region at every step


class MaskConvention(str, Enum):
    """How mask and masked image are presented to an inpainting model (see the module docstring)."""
    SD = "sd"
    COMPVIS = "compvis"


def masked_inputs(image: ArrayLike, mask: ArrayLike, convention: Union[MaskConvention, str] = MaskConvention.SD
                  ) -> tuple[ArrayLike, ArrayLike]:
    """(mask as the model reads it, masked image) from an image in [-1, 1] and a {0, 1} mask (1 = fill).

    Works on numpy arrays or tensors of matching layout (mask broadcastable against the image).
    """
    convention = MaskConvention(convention)
    hole = mask > 0.5
    keep = 1.0 - hole.astype(image.dtype) if isinstance(hole, np.ndarray) else (~hole).to(image.dtype)
    if convention is MaskConvention.SD:
        return hole * 1.0, image * keep
    return hole * 2.0 - 1.0, image * keep - (1.0 - keep)


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (B, 1, H, W) mask at the latent size by nearest-neighbour resampling (CompVis and SD2 inpainting)."""
    return F.interpolate(mask.float(), size=tuple(size), mode="nearest")


def latent_known_region(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """1 where a latent pixel sees no masked pixel at all (area downsampling), so every hole pixel is regenerated."""
    return (F.interpolate(mask.float(), size=tuple(size), mode="area") <= 0).float()


def with_prior(batch: dict) -> dict:
    """A DreamBooth batch (instance items and their `prior_*` class items) as one batch of both, its class items
    marked by a PRIOR_FLAG entry; a batch without class items is returned as it is."""
    prior = {k[len(PRIOR_PREFIX):]: v for k, v in batch.items() if k.startswith(PRIOR_PREFIX)}
    if not prior:
        return batch
    merged = {k: v for k, v in batch.items() if not k.startswith(PRIOR_PREFIX)}
    sizes = set()
    device = None
    for key, extra in prior.items():
        if key not in merged:
            raise KeyError(f"batch has {PRIOR_PREFIX}{key} but no {key}; keys: {sorted(batch)}")
        own = merged[key]
        sizes.add((len(own), len(extra)))
        if isinstance(own, torch.Tensor):
            merged[key], device = torch.cat([own, extra.to(own.device, own.dtype)]), own.device
        else:
            merged[key] = list(own) + list(extra)
    if len(sizes) != 1:
        raise ValueError(f"DreamBooth batch: instance and class entries of different sizes {sorted(sizes)}")
    n, n_prior = sizes.pop()
    merged[PRIOR_FLAG] = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n_prior, dtype=torch.bool)]).to(device)
    return merged


def prior_weights(batch: dict, weight: float) -> Optional[torch.Tensor]:
    """Per-item loss weights of a merged DreamBooth batch: the sum of weight_i * loss_i is the instance items' mean
    loss plus `weight` times the class items' mean (Ruiz et al. 2023, eq. 2); None for an ordinary batch."""
    flag = batch.get(PRIOR_FLAG)
    if flag is None:
        return None
    n_prior, n = int(flag.sum()), int((~flag).sum())
    return torch.where(flag, weight / max(n_prior, 1), 1.0 / max(n, 1)).float()
