"""LPIPS perceptual distance (Zhang et al. 2018): the `lpips` linear heads on a torchvision ImageNet backbone.

Both are resolved by `ldm.pretrained`: the backbone from `perceptual_backbone_path`, else the torch hub cache,
else torchvision's download (when not offline); the heads from `perceptual_heads_path`, else the copy shipped
in the `lpips` package. Both are loaded strictly (every tensor present, every shape checked).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from torch import nn

from ldm.pretrained import Lookup, PretrainedWeightsMissing, resolve_torch_hub_file

logger = logging.getLogger(__name__)

Backbone = Literal["pretrained", "random"]
Net = Literal["vgg", "alex"]

BACKBONE_KEY = "model.params.lossconfig.params.perceptual_backbone_path"
HEADS_KEY = "model.params.lossconfig.params.perceptual_heads_path"
LPIPS_VERSION = "0.1"

# Kept for callers catching the old name: the backbone's weights are missing.
PerceptualBackboneMissing = PretrainedWeightsMissing


def backbone_url(net: Net) -> str:
    """torchvision's ImageNet weights of the LPIPS backbone (their file name carries the hash prefix)."""
    import torchvision.models as tvm
    weights = {"vgg": tvm.VGG16_Weights.IMAGENET1K_V1, "alex": tvm.AlexNet_Weights.IMAGENET1K_V1}
    return weights[net].url


def resolve_heads(net: Net, heads_path: Optional[Union[str, Path]] = None) -> Path:
    """The LPIPS linear heads: an explicit file, else the one shipped in the `lpips` package."""
    import lpips
    look = Lookup(f"LPIPS {net} linear heads (v{LPIPS_VERSION})", HEADS_KEY, f"{net}.pth of the lpips package")
    path = look.explicit(heads_path)
    if path is not None:
        return path
    packaged = Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"
    if look.found(f"lpips package: {packaged}", packaged if packaged.is_file() else None):
        return packaged
    raise look.missing()


def _copy_strict(params: dict[str, nn.Parameter], sd: dict[str, torch.Tensor], path: Path, kind: str) -> int:
    for key, param in params.items():
        if key not in sd:
            raise RuntimeError(f"{path}: {kind} weights lack '{key}' (is it the right file?)")
        if sd[key].shape != param.shape:
            raise RuntimeError(f"{path}: '{key}' has shape {tuple(sd[key].shape)}, expected {tuple(param.shape)}")
        param.data.copy_(sd[key])
    return len(params)


def _load_backbone(lp: nn.Module, path: Path) -> None:
    from ldm.checkpoint import load_checkpoint
    params = {f"features.{idx}.{pname}": param
              for name, sl in lp.net.named_children() if name.startswith("slice")
              for idx, layer in sl.named_children() for pname, param in layer.named_parameters(recurse=False)}
    n = _copy_strict(params, load_checkpoint(path), path, "backbone")
    logger.info("LPIPS backbone: loaded %d tensors from %s", n, path)


def _load_heads(lp: nn.Module, path: Path) -> None:
    from ldm.checkpoint import load_checkpoint
    params = {k: p for k, p in lp.named_parameters() if k.startswith("lin")}
    n = _copy_strict(params, load_checkpoint(path), path, "LPIPS head")
    logger.info("LPIPS heads: loaded %d tensors from %s", n, path)


def build_lpips(net: Net = "vgg", backbone: Backbone = "pretrained",
                backbone_path: Optional[Union[str, Path]] = None,
                heads_path: Optional[Union[str, Path]] = None) -> nn.Module:
    """An `lpips.LPIPS` (keys as CompVis/taming: scaling_layer, net.sliceN, linN) frozen in eval mode."""
    import lpips

    if net not in ("vgg", "alex"):
        raise ValueError(f"LPIPS net must be one of ['alex', 'vgg'], got '{net}'")
    if backbone not in ("pretrained", "random"):
        raise ValueError(f"perceptual_backbone must be 'pretrained' or 'random', got '{backbone}'")
    path: Optional[Path] = None
    if backbone == "pretrained":
        path = resolve_torch_hub_file(
            backbone_url(net), what=f"LPIPS: the ImageNet weights of torchvision's {net} backbone",
            config_key=BACKBONE_KEY, explicit=backbone_path,
            hint="To train with a randomly initialised backbone instead (a different loss than LPIPS), set "
                 "`perceptual_backbone: random` explicitly, or `perceptual_weight: 0.0` to train without it.")
    heads = resolve_heads(net, heads_path)
    lp = lpips.LPIPS(pretrained=False, net=net, version=LPIPS_VERSION, pnet_rand=True, verbose=False)
    _load_heads(lp, heads)
    if path is not None:
        _load_backbone(lp, path)
    else:
        logger.warning("LPIPS with a RANDOM %s backbone (perceptual_backbone: random): "
                       "this is not the published LPIPS distance.", net)
    lp.eval()
    for p in lp.parameters():
        p.requires_grad_(False)
    return lp
