"""LPIPS perceptual distance (Zhang et al. 2018) from the `lpips` heads and a torchvision backbone read offline."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

Backbone = Literal["pretrained", "random"]

# torchvision's ImageNet weight files, as stored in the torch hub cache (`<hub dir>/checkpoints/`).
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


class PerceptualBackboneMissing(FileNotFoundError):
    """The ImageNet weights of the LPIPS backbone are not on this machine."""


def expected_backbone_file(net: str) -> Path:
    """Where torchvision keeps the backbone weights in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def _load_backbone(lp: nn.Module, path: Path) -> None:
    from ldm.checkpoint import load_checkpoint
    sd = load_checkpoint(path)
    slices = [m for name, m in lp.net.named_children() if name.startswith("slice")]
    loaded = 0
    for sl in slices:
        for idx, layer in sl.named_children():
            for pname, param in layer.named_parameters(recurse=False):
                key = f"features.{idx}.{pname}"
                if key not in sd:
                    raise RuntimeError(f"{path}: backbone weights lack '{key}' (is it the torchvision file?)")
                if sd[key].shape != param.shape:
                    raise RuntimeError(f"{path}: '{key}' has shape {tuple(sd[key].shape)}, expected {tuple(param.shape)}")
                param.data.copy_(sd[key])
                loaded += 1
    logger.info("LPIPS backbone: loaded %d tensors from %s", loaded, path)


def build_lpips(net: Literal["vgg", "alex"] = "vgg", backbone: Backbone = "pretrained",
                backbone_path: Optional[Union[str, Path]] = None) -> nn.Module:
    """An `lpips.LPIPS` (keys as CompVis/taming: scaling_layer, net.sliceN, linN) frozen in eval mode."""
    import lpips

    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_FILES)}, got '{net}'")
    if backbone not in ("pretrained", "random"):
        raise ValueError(f"perceptual_backbone must be 'pretrained' or 'random', got '{backbone}'")
    path: Optional[Path] = None
    if backbone == "pretrained":
        path = Path(os.path.expanduser(str(backbone_path))) if backbone_path else expected_backbone_file(net)
        if not path.is_file():
            raise PerceptualBackboneMissing(
                f"LPIPS needs the ImageNet weights of torchvision's {net} backbone, expected at {path} "
                f"(the torch hub cache, or set `perceptual_backbone_path` in the loss params). "
                f"They are not downloaded at run time. To train with a randomly initialised backbone "
                f"instead (a different loss than LPIPS), set `perceptual_backbone: random` explicitly, "
                f"or use `perceptual_weight: 0.0` to train without a perceptual term.")
    lp = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if path is not None:
        _load_backbone(lp, path)
    else:
        logger.warning("LPIPS with a RANDOM %s backbone (perceptual_backbone: random): "
                       "this is not the published LPIPS distance.", net)
    lp.eval()
    for p in lp.parameters():
        p.requires_grad_(False)
    return lp
