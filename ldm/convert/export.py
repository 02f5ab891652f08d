"""Exporting a checkpoint for sharing: `.safetensors` or a CompVis `.ckpt`, in fp32 / fp16 / bf16, optionally with
the EMA weights in place of the training weights and without the training-only parts (the autoencoder's loss:
discriminator and LPIPS). Reading the file back with ldm.util.load_model_from_config gives the same model."""
from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ldm.checkpoint import check_finite, extract_state_dict, load_checkpoint
from ldm.errors import InputError
from ldm.files import atomic_path, check_outputs
from ldm.precision import DTYPES

logger = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("decay", "num_updates")
# Keys only training needs: the first stage's loss (PatchGAN discriminator, LPIPS), inside or outside an LDM.
TRAINING_ONLY_PREFIXES = ("loss.", "first_stage_model.loss.")
# File types an export can be written as: safetensors, or a CompVis torch pickle of tensors only.
EXPORT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


class ExportDType(str, Enum):
    """Floating-point dtype of the exported tensors (integer buffers keep theirs)."""
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch(self) -> torch.dtype:
        return DTYPES[self.value]


def ema_shadow_name(model_key: str) -> Optional[str]:
    """The EMA buffer of a diffusion model parameter: `model.a.b.c` -> `model_ema.abc` (CompVis' LitEma naming)."""
    if not model_key.startswith("model."):
        return None
    return EMA_PREFIX + model_key[len("model."):].replace(".", "")


def swap_in_ema(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each `model.*` parameter replaced by its EMA copy, and the `model_ema.*` keys dropped."""
    out = dict(sd)
    shadows = [k for k in sd if k.startswith(EMA_PREFIX) and k[len(EMA_PREFIX):] not in EMA_BOOKKEEPING]
    if not shadows:
        raise InputError("ema_only: the checkpoint has no EMA weights (model_ema.*); export without ema_only")
    swapped = 0
    for key in sd:
        shadow = ema_shadow_name(key)
        if shadow is not None and shadow in sd:
            out[key] = sd[shadow].to(sd[key].dtype)
            swapped += 1
    unused = len(shadows) - swapped
    if unused:
        raise InputError(f"ema_only: {unused} EMA tensors match no model.* parameter (not a CompVis LitEma layout?)")
    for key in list(out):
        if key.startswith(EMA_PREFIX):
            del out[key]
    logger.info("export: %d model weights replaced by their EMA copies", swapped)
    return out


def prepare_state_dict(sd: Mapping[str, torch.Tensor], dtype: Union[ExportDType, str] = ExportDType.FP32,
                       ema_only: bool = False, strip_training: bool = False) -> dict[str, torch.Tensor]:
    """The tensors to export: EMA swapped in, training-only parts dropped, floats cast to `dtype`."""
    dtype = ExportDType(dtype)
    out = swap_in_ema(sd) if ema_only else dict(sd)
    if strip_training:
        dropped = [k for k in out if k.startswith(TRAINING_ONLY_PREFIXES)]
        for k in dropped:
            del out[k]
        logger.info("export: dropped %d training-only tensors (%s)", len(dropped), ", ".join(TRAINING_ONLY_PREFIXES))
    return {k: v.detach().to(device="cpu", dtype=dtype.torch if v.is_floating_point() else v.dtype).contiguous()
            for k, v in out.items()}


def export_checkpoint(source: Union[str, Path, Mapping[str, Any], torch.nn.Module], path: Union[str, Path], *,
                      dtype: Union[ExportDType, str] = ExportDType.FP32, ema_only: bool = False,
                      strip_training: bool = False, allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Write `source` (a checkpoint file, a checkpoint dict, a state dict or a module) to `path`:
    `.safetensors` (settings in the metadata) or `.ckpt` / `.pt` (CompVis layout: {"state_dict", "global_step"}).

    `path` is never the source file, nor (unless `overwrite`) an existing file; it is written atomically.
    """
    path = Path(path)
    if path.suffix not in EXPORT_SUFFIXES:
        raise InputError(f"export: unknown format '{path.suffix}' for {path}; use "
                         f"{' or '.join(EXPORT_SUFFIXES)}")
    check_outputs([path], [source] if isinstance(source, (str, Path)) else [], overwrite=overwrite, flag="export path")
    global_step = None
    if isinstance(source, torch.nn.Module):
        sd = source.state_dict()
    else:
        ckpt = load_checkpoint(source, allow_pickle=allow_pickle) if isinstance(source, (str, Path)) else dict(source)
        global_step = ckpt.get("global_step")
        sd = extract_state_dict(ckpt)
    check_finite(sd, str(source) if isinstance(source, (str, Path)) else "export source")
    tensors = prepare_state_dict(sd, dtype, ema_only, strip_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"dtype": ExportDType(dtype).value, "ema_only": ema_only, "strip_training": strip_training,
                "global_step": global_step}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(tmp), metadata={"format": "pt", "ldm_export": json.dumps(settings)})
        else:
            torch.save({"state_dict": tensors, "global_step": global_step or 0, "ldm_export": settings}, tmp)
    logger.info("export: %d tensors to %s (%s)", len(tensors), path, settings)
    return path
