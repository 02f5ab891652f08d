"""Reconstruction metrics on images in [-1, 1]: PSNR, SSIM (torchmetrics) and LPIPS when available."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def reconstruction_metrics(x: torch.Tensor, rec: torch.Tensor, lpips_net: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """PSNR and SSIM with data range 1 on [0, 1] images (mean over the batch); LPIPS if a net is given."""
    a, b = to_unit(x), to_unit(rec)
    out = {
        "psnr": peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean(),
        "ssim": structural_similarity_index_measure(b, a, data_range=1.0),
    }
    if lpips_net is not None:
        out["lpips"] = lpips_net(rec.clamp(-1, 1), x).mean()
    return out
