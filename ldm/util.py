"""Config instantiation (`target` + `params`), config loading and small helpers."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.config_keys import report_once, unknown_keys, unknown_keys_message
from ldm.errors import InputError

logger = logging.getLogger(__name__)

# CompVis sentinel targets that stand for "no module here".
_NONE_TARGETS = ("__is_first_stage__", "__is_unconditional__")


class ConfigError(InputError):
    """A config could not be read or instantiated; the message names the file, key or target."""


def _key_path(config: Any, fallback: str) -> str:
    """Full dotted key of an OmegaConf node (e.g. `model.params.lossconfig`), else `fallback`."""
    if isinstance(config, (DictConfig, ListConfig)):
        try:
            full = config._get_full_key(None)  # noqa: SLF001 - OmegaConf keeps the node's path
            if full:
                return str(full)
        except Exception:  # pragma: no cover - older OmegaConf
            pass
    return fallback


# Users' configs name classes of the taming-transformers package (CompVis/latent-diffusion used it for its
# first-stage losses and face datasets). Without that package installed, these names map to this project's
# classes; with it installed, the real `taming` module is used.
TAMING_EQUIVALENTS = {
    "taming.modules.losses.vqperceptual": "ldm.modules.losses.vqperceptual",
    "taming.modules.losses.lpips": "ldm.modules.losses.lpips",
    "taming.modules.discriminator.model": "ldm.modules.losses.discriminator",
    "taming.modules.vqvae.quantize": "ldm.modules.vqvae.quantize",
    "taming.data.faceshq": "ldm.data.faceshq",
}
def _taming_module(module_name: str) -> Optional[str]:
    """This project's module for a `taming.*` module when the taming package is not installed, else None."""
    if not (module_name == "taming" or module_name.startswith("taming.")):
        return None
    if importlib.util.find_spec("taming") is not None:
        return None  # the real taming-transformers is installed: use it
    return TAMING_EQUIVALENTS.get(module_name)


def get_obj_from_str(string: str, reload: bool = False, key: str = "target") -> Any:
    """Import `package.module.Name` and return the attribute, with errors naming the target."""
    if not isinstance(string, str) or "." not in string:
        raise ConfigError(f"{key}: '{string}' is not an import path of the form package.module.Name")
    module_name, cls_name = string.rsplit(".", 1)
    substitute = _taming_module(module_name)
    if substitute is not None:
        report_once("%s: the taming package is not installed; using %s.%s", string, substitute, cls_name)
        module_name = substitute
    try:
        module = importlib.import_module(module_name)
        if reload:
            module = importlib.reload(module)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module '{module_name}' for target '{string}': {e}") from e
    if not hasattr(module, cls_name):
        raise ConfigError(f"{key}: module '{module_name}' has no attribute '{cls_name}' (target '{string}')")
    return getattr(module, cls_name)


def instantiate_from_config(config: Any, key: str = "<config>", extra_params: Optional[Mapping[str, Any]] = None) -> Any:
    """Build `target(**params, **extra_params)`; errors name the config key path and the target."""
    path = _key_path(config, key)
    if not isinstance(config, (Mapping, DictConfig)) or "target" not in config:
        if config in _NONE_TARGETS:
            return None
        raise ConfigError(f"{path}: expected a mapping with a `target:` key to instantiate, got {config!r}")
    target = config["target"]
    obj = get_obj_from_str(target, key=f"{path}.target")
    params = config.get("params", None)
    if params is None:
        params = {}
    if isinstance(params, DictConfig):
        # nested sub-configs stay DictConfig nodes, so that their errors can name their key path
        params = {k: params[k] for k in params}
    elif not isinstance(params, Mapping):
        raise ConfigError(f"{path}.params: expected a mapping of keyword arguments for '{target}'")
    kwargs = dict(params)
    kwargs.update(extra_params or {})
    if callable(obj):
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            sig = None
        if sig is not None:
            named = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            open_ended = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
            typos = [] if open_ended else sorted(set(kwargs) - named)
            if typos:
                raise ConfigError(f"bad parameters for target '{target}': "
                                  + unknown_keys_message(f"{path}.params", typos, named))
            try:
                sig.bind(**kwargs)
            except TypeError as e:
                accepted = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
                raise ConfigError(
                    f"{path}.params: bad parameters for target '{target}': {e}. "
                    f"Accepted: {', '.join(accepted)}") from e
        typos, accepted = unknown_keys(obj, kwargs)  # keys that a constructor chain of **kwargs never reads
        if typos:
            raise ConfigError(f"bad parameters for target '{target}': "
                              + unknown_keys_message(f"{path}.params", typos, accepted))
    try:
        return obj(**kwargs)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}: building target '{target}' failed: {type(e).__name__}: {e}") from e


def load_config(paths: Union[str, Path, Sequence[Union[str, Path]]]) -> DictConfig:
    """Load YAML configs and merge them left to right; YAML errors name the file and line."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    configs = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            cfg = OmegaConf.load(p)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from e
        except Exception as e:
            raise ConfigError(f"{p}: cannot read config: {e}") from e
        if not isinstance(cfg, DictConfig):
            raise ConfigError(f"{p}: a config must be a YAML mapping at the top level")
        configs.append(cfg)
    merged = OmegaConf.create()
    for cfg in configs:
        merged = OmegaConf.merge(_drop_replaced_params(merged, cfg), cfg)
    return merged


def _drop_replaced_params(base: DictConfig, overlay: DictConfig, path: str = "") -> DictConfig:
    """`base` without the `params` of every node whose `target` `overlay` replaces by another: those parameters were
    the old target's, so the new target takes the overlay's `params` alone (not a merge of both)."""
    if not (isinstance(base, DictConfig) and isinstance(overlay, DictConfig)):
        return base
    new_target = overlay.get("target") if "target" in overlay else None
    if new_target is not None and "target" in base and base.get("target") not in (None, new_target) and "params" in base:
        logger.info("config: %s target %s replaces %s; its params are the new config's only", path or "<root>",
                    new_target, base.get("target"))
        base = base.copy()
        del base["params"]
    for key in overlay:
        if key in base and isinstance(base.get(key), DictConfig) and isinstance(overlay.get(key), DictConfig):
            child = _drop_replaced_params(base[key], overlay[key], f"{path}.{key}" if path else str(key))
            if child is not base[key]:
                base = base.copy()
                base[key] = child
    return base


def check_no_missing(config: DictConfig, what: str = "config") -> None:
    """Raise naming every mandatory (`???`) key that is still unset."""
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(
            f"{what}: these keys must be set (append e.g. `{missing[0]}=VALUE` to the command line "
            f"or set them in a --base config): {', '.join(missing)}")


def load_model_from_config(config: Union[DictConfig, str, Path], ckpt_path: Optional[Union[str, Path]] = None,
                           *, strict: bool = True, allow_pickle: bool = False,
                           device: Union[str, torch.device] = "cpu", eval_mode: bool = True,
                           dtype: Optional[Union[str, torch.dtype]] = None) -> torch.nn.Module:
    """Instantiate `config.model` and load weights from `ckpt_path` (safe by default).

    `dtype` (fp32, bf16, fp16, auto or a torch dtype): the networks are cast before the weights are read,
    so a half-precision checkpoint loads without a round trip through float32.
    """
    from ldm.checkpoint import extract_state_dict, load_checkpoint, load_state_dict_checked
    from ldm.precision import cast_weights, resolve_weights_dtype

    if not isinstance(config, DictConfig):
        config = load_config(config)
    model_cfg = config.model if "model" in config else config
    ckpt = load_checkpoint(ckpt_path, allow_pickle=allow_pickle) if ckpt_path is not None else None  # fails fast
    model = instantiate_from_config(model_cfg, key="model")
    target = resolve_weights_dtype(dtype, extract_state_dict(ckpt) if ckpt is not None else None)
    if target is not None:
        cast_weights(model, target)
    if ckpt is not None:
        if "global_step" in ckpt:
            logger.info("%s: global step %s", ckpt_path, ckpt["global_step"])
        load_state_dict_checked(model, ckpt, strict=strict, source=str(ckpt_path))
        model.ckpt_global_step = ckpt.get("global_step")  # the training step the weights come from (or None)
    model.to(device)
    if eval_mode:
        model.eval()
    return model


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    """Number of parameters of `model` (optionally printed in millions)."""
    n = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {n * 1.e-6:.2f} M params.")
    return n


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if val is not None:
        return val
    return d() if inspect.isfunction(d) else d


def as_list(x: Union[None, Any, Iterable[Any]]) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple, ListConfig)):
        return list(x)
    return [x]
