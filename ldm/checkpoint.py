"""Safe checkpoint reading (safetensors, weights-only pickles) and checked state-dict loading."""
from __future__ import annotations

import logging
import pickle
import warnings
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


# A sharded checkpoint (FSDP's `state_dict: sharded`, ldm.parallel) is a torch.distributed.checkpoint folder: this
# file lists its tensors, one file per rank holds them, and Lightning's meta.pt holds the counters.
SHARDED_METADATA = ".metadata"
SHARDED_META = "meta.pt"
# what the folder's metadata pickle may name: its own record types, sizes, dtypes, layouts and the file paths
_SHARDED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_SHARDED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


def is_sharded_checkpoint(path: Union[str, Path]) -> bool:
    return Path(path).is_dir() and (Path(path) / SHARDED_METADATA).is_file()


def checkpoint_exists(path: Union[str, Path]) -> bool:
    """A checkpoint file, or a sharded checkpoint folder."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


class _ShardedMetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's metadata, refusing every other global (the pickle could otherwise run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module in _SHARDED_MODULES or (module, name) in _SHARDED_GLOBALS
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global {module}.{name}")


def _sharded_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        """FileSystemReader whose metadata is read by the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            file = path / SHARDED_METADATA
            try:
                with open(file, "rb") as fh:
                    metadata = _ShardedMetadataUnpickler(fh).load()
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{file}: refusing to load: it names {str(e).removeprefix('Unsupported global ')}, "
                                      f"which a sharded checkpoint's metadata does not hold. {ALLOW_PICKLE_HINT}") from e
            except (EOFError, AttributeError, ValueError, TypeError) as e:
                raise CheckpointError(f"{file}: corrupt or truncated sharded-checkpoint metadata: {e}") from e
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedReader(str(path))


def load_sharded_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """A sharded checkpoint folder gathered into one checkpoint dict: every tensor under `state_dict` (read as raw
    storage; the optimizer state and other pickled entries are not read) and the counters of its meta.pt."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    path = Path(path)
    reader = _sharded_reader(path)
    metadata = reader.read_metadata()
    prefix = "state_dict."
    sd = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
          for k, m in metadata.state_dict_metadata.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not sd:
        raise CheckpointError(f"{path}: a sharded checkpoint without a state_dict (keys: "
                              f"{_summarize(sorted(metadata.state_dict_metadata))})")
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process reads all shards
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load({"state_dict": sd}, storage_reader=reader, no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # a missing or truncated rank file
        raise CheckpointError(f"{path}: could not read the shards: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    out: Dict[str, Any] = {}
    if (path / SHARDED_META).is_file():
        out.update(load_checkpoint(path / SHARDED_META))
    out["state_dict"] = sd
    return out


def check_sharded_checkpoint(path: Union[str, Path]) -> None:
    """Before Lightning resumes from a sharded folder (torch.distributed.checkpoint unpickles its metadata and its
    non-tensor entries, e.g. the optimizer's settings, without restriction): every such pickle is read here first,
    the metadata by the restricted unpickler and each entry with weights_only=True; anything else is refused."""
    import io

    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class CheckedBytes(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{path}: refusing to resume: its entry {read_item.dest_index.fqn} holds pickled "
                                      f"Python objects beyond plain data. {ALLOW_PICKLE_HINT}") from e
            value.seek(0)
            super().load_bytes(read_item, value)

    path = Path(path)
    reader = _sharded_reader(path)
    keys = {k for k, m in reader.read_metadata().state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)}
    if keys:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                _load_state_dict({}, storage_reader=_sharded_reader(path), planner=CheckedBytes(keys=keys),
                                 no_dist=True)
        except (Exception, CheckpointException) as e:  # torch wraps a read's error (failures: rank -> error)
            for failure in getattr(e, "failures", {}).values():
                inner = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(inner, CheckpointError):
                    raise inner from None
            raise CheckpointError(f"{path}: could not read the sharded checkpoint: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e


def load_checkpoint(path: Union[str, Path], *, allow_pickle: bool = False,
                    map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read `.safetensors`, a torch pickle with `weights_only=True` unless explicitly allowed, or a sharded
    checkpoint folder (its tensors, gathered)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return load_sharded_checkpoint(path)
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
                            prefix: Optional[str] = None,
                            expected_missing: Optional[Callable[[str], bool]] = None) -> tuple[list[str], list[str]]:
    """Load into `module`; missing/unexpected keys raise (strict) or are logged, never silently ignored
    (`expected_missing`: keys the caller knows are new, e.g. a video model's temporal layers, returned unlogged)."""
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
    unannounced = [k for k in missing if expected_missing is None or not expected_missing(k)]
    if unannounced:
        logger.warning("%s: %d missing keys: %s", source, len(unannounced), _summarize(unannounced))
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
