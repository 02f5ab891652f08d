"""Safe checkpoint reading (safetensors, weights-only pickles) and checked state-dict loading."""
from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)

# Keys that recent library versions no longer keep but old checkpoints carry; dropped with a note.
TOLERATED_UNEXPECTED_SUFFIXES: tuple[str, ...] = ("text_model.embeddings.position_ids",)

ALLOW_PICKLE_HINT = ("pass allow_pickle=True (command line: --unsafe-load) only if you trust the file; "
                     "that lets the file run code when it is read")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model; the message names the file."""


def load_checkpoint(path: Union[str, Path], *, allow_pickle: bool = False,
                    map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read `.safetensors`, or a torch pickle with `weights_only=True` unless explicitly allowed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return {"state_dict": load_file(str(path), device=str(map_location))}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refusing to load: the file holds pickled Python objects beyond tensors and "
                f"plain containers, and unpickling them could execute code. {ALLOW_PICKLE_HINT}. "
                f"Details: {str(e).splitlines()[0]}") from e
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping (a state dict or a checkpoint dict), got {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(ckpt: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint dict (`state_dict` key), or the mapping itself."""
    sd = ckpt.get("state_dict", ckpt)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def filter_keys(sd: Mapping[str, torch.Tensor], ignore_keys: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """Drop keys starting with any of `ignore_keys` (the CompVis `ignore_keys` option)."""
    ignore = tuple(ignore_keys)
    out = {}
    for k, v in sd.items():
        if ignore and k.startswith(ignore):
            logger.info("Deleting key %s from state_dict (ignore_keys).", k)
            continue
        out[k] = v
    return out


def _summarize(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    return head + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_checked(module: torch.nn.Module, ckpt_or_sd: Mapping[str, Any], *, strict: bool = True,
                            ignore_keys: Iterable[str] = (), source: str = "<state dict>",
                            prefix: Optional[str] = None) -> tuple[list[str], list[str]]:
    """Load into `module`; missing/unexpected keys raise (strict) or are logged, never silently ignored."""
    sd = extract_state_dict(ckpt_or_sd)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = filter_keys(sd, ignore_keys)
    own = module.state_dict()
    tolerated = [k for k in sd if k not in own and k.endswith(TOLERATED_UNEXPECTED_SUFFIXES)]
    for k in tolerated:
        logger.info("%s: dropping %s (kept as a buffer by older library versions only)", source, k)
        sd.pop(k)
    shape_mismatch = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                      for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if shape_mismatch:
        raise CheckpointError(f"{source}: shape mismatch for {len(shape_mismatch)} tensors: "
                              + "; ".join(shape_mismatch[:8]))
    result = module.load_state_dict(sd, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        msg = [f"{source}: state dict does not match {module.__class__.__name__}."]
        if missing:
            msg.append(f"Missing {len(missing)} keys: {_summarize(missing)}.")
        if unexpected:
            msg.append(f"Unexpected {len(unexpected)} keys: {_summarize(unexpected)}.")
        msg.append("Use ignore_keys for keys to drop, or strict=False to load partially (keys are then reported).")
        raise CheckpointError(" ".join(msg))
    if missing:
        logger.warning("%s: %d missing keys: %s", source, len(missing), _summarize(missing))
    if unexpected:
        logger.warning("%s: %d unexpected keys: %s", source, len(unexpected), _summarize(unexpected))
    return missing, unexpected


def init_from_ckpt(module: torch.nn.Module, path: Union[str, Path], ignore_keys: Iterable[str] = (), *,
                   strict: bool = True, allow_pickle: bool = False,
                   tolerate_prefixes: Sequence[str] = (), prefix: Optional[str] = None,
                   transform: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None
                   ) -> tuple[list[str], list[str]]:
    """The CompVis `init_from_ckpt(path, ignore_keys)`, safe and checked.

    Keys under `tolerate_prefixes` (parts not needed to run the model, e.g. a training loss) may be
    missing or unexpected and are only logged; any other mismatch raises when `strict`. `transform`
    adapts the checkpoint's state dict (full key names) before loading, e.g. to widen a layer.
    """
    ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    if transform is not None:
        ckpt = transform(extract_state_dict(ckpt))
    out = load_state_dict_checked(module, ckpt, strict=False, ignore_keys=ignore_keys, source=str(path), prefix=prefix)
    bad = [k for k in out[0] + out[1] if not k.startswith(tuple(tolerate_prefixes))]
    if strict and bad:
        raise CheckpointError(f"{path}: state dict does not match {module.__class__.__name__}: "
                              f"{len(bad)} missing or unexpected keys: {_summarize(bad)}. "
                              f"Use ignore_keys for keys to drop.")
    logger.info("Restored %s from %s", module.__class__.__name__, path)
    return out
