"""Safe checkpoint reading (safetensors, weights-only pickles) and checked state-dict loading."""
from __future__ import annotations

import logging
import pickle
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

from ldm.errors import InputError

logger = logging.getLogger(__name__)

# Keys that recent library versions no longer keep but old checkpoints carry; dropped with a note.
TOLERATED_UNEXPECTED_SUFFIXES: tuple[str, ...] = ("text_model.embeddings.position_ids",)

ALLOW_PICKLE_HINT = ("pass allow_pickle=True (command line: --unsafe-load) only if you trust the file; "
                     "that lets the file run code when it is read")


class CheckpointError(InputError, RuntimeError):
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
    except Exception as e:  # torch.load fails in many ways on a file that is not a checkpoint (KeyError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, truncated, or another kind of file): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping (a state dict or a checkpoint dict), got {type(obj).__name__}")
    return dict(obj)


class ModelKind(str, Enum):
    """What a checkpoint or a config holds, as the scripts name it in their messages."""
    DIFFUSION = "diffusion model"
    AUTOENCODER = "autoencoder"
    OTHER = "model of another kind"


# State-dict key prefixes that tell the kinds apart (CompVis layouts: the LDM's UNet, the autoencoder's codec).
_KIND_PREFIXES = ((ModelKind.DIFFUSION, ("model.diffusion_model.",)),
                  (ModelKind.AUTOENCODER, ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")))


def weights_kind(sd: Mapping[str, Any]) -> ModelKind:
    """The kind of model a state dict is of, from its key prefixes."""
    for kind, prefixes in _KIND_PREFIXES:
        if any(k.startswith(prefixes) for k in sd):
            return kind
    return ModelKind.OTHER


def target_kind(target: type) -> ModelKind:
    """The kind of the model class a config's `model.target` names: the class says (`model_kind`), else OTHER."""
    kind = getattr(target, "model_kind", None) if isinstance(target, type) else None
    return kind if isinstance(kind, ModelKind) else ModelKind.OTHER


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def require_kind(target: type, expected: ModelKind, what: str) -> None:
    """Refuse a model class of another kind than `expected`, naming `what` (the checkpoint / config) and the class."""
    kind = target_kind(target)
    if kind is not expected:
        raise CheckpointError(f"{what} is {_a(kind.value)} ({getattr(target, '__name__', target)}); "
                              f"{_a(expected.value)} is needed here")


def check_finite(sd: Mapping[str, Any], source: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor and how many there are."""
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        v = sd[bad[0]]
        n_nan, n_inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) hold NaN or Inf values, first {bad[0]} "
                              f"({n_nan} NaN, {n_inf} Inf of {v.numel()}); the weights are unusable (a diverged run? "
                              f"resume from an earlier checkpoint)")


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
    check_finite(sd, source)
    own = module.state_dict()
    tolerated = [k for k in sd if k not in own and k.endswith(TOLERATED_UNEXPECTED_SUFFIXES)]
    for k in tolerated:
        logger.info("%s: dropping %s (kept as a buffer by older library versions only)", source, k)
        sd.pop(k)
    shape_mismatch = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                      for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if shape_mismatch:
        raise CheckpointError(f"{source}: shape mismatch for {len(shape_mismatch)} tensors: "
                              + "; ".join(shape_mismatch[:8]) + _kind_hint(module, sd))
    result = module.load_state_dict(sd, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing and hasattr(module, "missing_after_base"):  # a LoRA run's checkpoint: the base supplies the rest
        missing = module.missing_after_base(ckpt_or_sd, missing, source)
    if strict and (missing or unexpected):
        msg = [f"{source}: state dict does not match {module.__class__.__name__}."]
        if missing:
            msg.append(f"Missing {len(missing)} keys: {_summarize(missing)}.")
        if unexpected:
            msg.append(f"Unexpected {len(unexpected)} keys: {_summarize(unexpected)}.")
        msg.append("Use ignore_keys for keys to drop, or strict=False to load partially (keys are then reported)."
                   + _kind_hint(module, sd))
        raise CheckpointError(" ".join(msg))
    if missing:
        logger.warning("%s: %d missing keys: %s", source, len(missing), _summarize(missing))
    if unexpected:
        logger.warning("%s: %d unexpected keys: %s", source, len(unexpected), _summarize(unexpected))
    return missing, unexpected


def _kind_hint(module: torch.nn.Module, sd: Mapping[str, Any]) -> str:
    """' The file holds an autoencoder; the config builds a diffusion model.' when the kinds differ, else ''."""
    have, want = weights_kind(sd), target_kind(type(module))
    if have is want or ModelKind.OTHER in (have, want):
        return ""
    return f" The file holds {_a(have.value)}'s weights; the config builds {_a(want.value)} ({type(module).__name__})."


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
