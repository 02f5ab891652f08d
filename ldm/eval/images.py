"""Images as evaluators read them: uint8 RGB tensors, quantized exactly as a saved PNG, PIL-bicubic resizing.

Two pitfalls of FID-style metrics are settled here, once:
- Samples are quantized to uint8 the way `ldm.files.to_uint8` writes them to PNG, so in-memory
  evaluation and evaluation of the saved PNG folder give the same numbers. Floats are never passed to an
  evaluator that expects bytes (torchmetrics' FID reads floats in [0, 1] only with `normalize=True`, and
  CLIP processors rescale by 1/255 whatever the dtype).
- Resizing to the feature extractor's input uses PIL's bicubic filter with antialiasing (clean-fid's
  finding: other resizers alias and shift FID by several points).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from PIL import Image

from ldm.errors import InputError


def to_uint8_rgb(images: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] or uint8 (B, C, H, W)/(B, H, W, C) -> uint8 (B, 3, H, W); gray is repeated."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dim() != 4:
        raise InputError(f"expected a batch of images (B, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
            images = images.permute(0, 3, 1, 2)
    elif images.is_floating_point():
        if images.shape[1] not in (1, 3):
            raise InputError(f"float images must be (B, C, H, W) with C 1 or 3, got {tuple(images.shape)}")
        # the PNG writer's quantization (ldm.files.to_uint8): [-1, 1] -> round((x + 1) * 127.5)
        images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    else:
        raise TypeError(f"images must be float in [-1, 1] or uint8, got {images.dtype}")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise InputError(f"expected 1 or 3 channels, got {images.shape[1]}")
    return images.cpu().contiguous()


def resize_bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, size, size) by PIL's antialiased bicubic filter, per channel in float.

    Each channel is resized as a 32-bit float image (PIL mode "F", as clean-fid does) and rounded back to uint8
    once, because the Inception extractor reads uint8.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = np.empty((images.shape[0], 3, size, size), dtype=np.uint8)
    arr = images.numpy()
    for i in range(arr.shape[0]):
        for ch in range(3):
            plane = Image.fromarray(arr[i, ch].astype(np.float32), mode="F")
            res = np.asarray(plane.resize((size, size), resample=Image.Resampling.BICUBIC))
            out[i, ch] = np.clip(np.round(res), 0, 255).astype(np.uint8)
    return torch.from_numpy(out)

