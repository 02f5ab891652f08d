"""A run directory of main.py before it is touched: the configs it saved, and the checks a new or resumed run must
pass first (trainer keys, value types, model changes, whether it has finished)."""
from __future__ import annotations

import difflib
import glob
import inspect
import os
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ldm.util import ConfigError

# Model-section keys a resume may change without --allow-model-changes: the optimisation, not the network.
RESUME_TUNABLE = ("model.base_learning_rate", "model.params.scheduler_config")
# CompVis' name for the trainer's devices (main.build_trainer_kwargs maps it to accelerator / devices).
COMPVIS_TRAINER_KEYS = ("gpus",)


def run_configs(logdir: str) -> list[str]:
    """Every config a run saved (configs/<time>-project.yaml and <time>-lightning.yaml), oldest first, as CompVis'
    main.py reloads them on resume."""
    return sorted(glob.glob(os.path.join(glob.escape(logdir), "configs", "*-project.yaml"))
                  + glob.glob(os.path.join(glob.escape(logdir), "configs", "*-lightning.yaml")))


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    """{dotted key: leaf value} of a config section (interpolations resolved where they can be)."""
    container = node
    if isinstance(node, DictConfig):
        try:
            container = OmegaConf.to_container(node, resolve=True)
        except Exception:  # an interpolation that cannot be resolved here (e.g. an unset env var): compare as written
            container = OmegaConf.to_container(node, resolve=False)
    if isinstance(container, dict):
        out: dict[str, Any] = {}
        for k, v in container.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out or {prefix: {}}
    return {prefix: container}


def model_changes(saved: DictConfig, config: DictConfig) -> list[str]:
    """'key: old -> new' for every model-section key a resume would change, apart from RESUME_TUNABLE."""
    old, new = _flat(saved.get("model", {}), "model"), _flat(config.get("model", {}), "model")
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]
    return [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in changed
            if not any(k == t or k.startswith(t + ".") for t in RESUME_TUNABLE)]


def check_trainer_keys(lightning_config: DictConfig) -> None:
    """Refuse `lightning.trainer` keys that pl.Trainer does not take, naming the closest valid one."""
    import pytorch_lightning as pl

    trainer_cfg = lightning_config.get("trainer", None)
    if trainer_cfg is None:
        return
    if not isinstance(trainer_cfg, DictConfig):
        raise ConfigError(f"lightning.trainer: expected a mapping of pl.Trainer arguments, got {trainer_cfg!r}")
    valid = [n for n in inspect.signature(pl.Trainer.__init__).parameters if n != "self"]
    for key in trainer_cfg:
        if key not in valid and key not in COMPVIS_TRAINER_KEYS:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else f". Valid keys: {', '.join(sorted(valid))}"
            raise ConfigError(f"lightning.trainer.{key}: not an argument of pytorch_lightning.Trainer{hint}")


def check_value_types(config: DictConfig) -> None:
    """The numbers main.py reads itself: model.base_learning_rate and data.params.batch_size."""
    checks = (("model.base_learning_rate", float, "a number, e.g. 1.0e-04"),
              ("data.params.batch_size", int, "a whole number, e.g. 16"))
    for key, kind, what in checks:
        value = OmegaConf.select(config, key, default=None)
        if value is None:
            continue
        try:
            ok = kind(value) == float(value) if not isinstance(value, bool) else False
        except (TypeError, ValueError):
            ok = False
        if not ok or float(value) <= 0:
            raise ConfigError(f"{key}: {value!r} is not valid; it must be a positive {what}")


def finished(ckpt: dict, trainer_cfg: DictConfig) -> Optional[str]:
    """Why a run whose checkpoint is `ckpt` has nothing left to train under `trainer_cfg` (max_steps or max_epochs
    reached), or None."""
    step = int(ckpt.get("global_step", 0) or 0)
    max_steps = trainer_cfg.get("max_steps", -1)
    if max_steps is not None and int(max_steps) > 0 and step >= int(max_steps):
        return f"it is at step {step}, lightning.trainer.max_steps is {max_steps}"
    epochs = (ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
              .get("completed"))
    max_epochs = trainer_cfg.get("max_epochs", None)
    if max_epochs is not None and int(max_epochs) >= 0 and epochs is not None and int(epochs) >= int(max_epochs) \
            and (max_steps is None or int(max_steps) < 0):
        return f"it has completed {epochs} epochs, lightning.trainer.max_epochs is {max_epochs}"
    return None
