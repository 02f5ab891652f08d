"""Runs of main.py: the layout of a run directory (the one place it is written down), the checks a new or resumed
run must pass before it is touched (trainer keys, value types, model changes, whether it has finished), and loading
a trained run for sampling."""
from __future__ import annotations

import difflib
import glob
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import ModelKind, checkpoint_exists, require_kind
from ldm.precision import WeightsDType
from ldm.util import ConfigError, get_obj_from_str, load_config, load_model_from_config

# Model-section keys a resume may change without --allow-model-changes: the optimisation, not the network.
RESUME_TUNABLE = ("model.base_learning_rate", "model.params.scheduler_config")
# CompVis' name for the trainer's devices (main.build_trainer_kwargs maps it to accelerator / devices).
COMPVIS_TRAINER_KEYS = ("gpus",)


@dataclass(frozen=True)
class RunDir:
    """A run directory of main.py: logs/<time>_<name>/ with checkpoints/ (last.ckpt, ...) and configs/
    (<time>-project.yaml and <time>-lightning.yaml, one pair per start)."""
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_checkpoint(cls, ckpt: Union[str, Path]) -> "RunDir":
        """The run holding `ckpt` (<run>/checkpoints/x.ckpt)."""
        return cls(Path(ckpt).resolve().parent.parent)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"

    def project_config(self, stamp: str) -> Path:
        return self.configs / f"{stamp}-project.yaml"

    def lightning_config(self, stamp: str) -> Path:
        return self.configs / f"{stamp}-lightning.yaml"

    def saved_configs(self, project_only: bool = False) -> list[str]:
        """Every config the run saved, oldest first (as CompVis' main.py reloads them on resume)."""
        kinds = ("project",) if project_only else ("project", "lightning")
        return sorted(p for k in kinds for p in glob.glob(os.path.join(glob.escape(str(self.configs)), f"*-{k}.yaml")))


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


# -- trained runs for sampling ----------------------------------------------------------------------------
def default_device() -> str:
    """CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def find_run_config(ckpt: Union[str, Path], run: Optional[Union[str, Path]] = None) -> Path:
    """The newest `configs/*-project.yaml` of the run directory `run`, by default the one holding `ckpt`
    (logs/<run>/checkpoints/x.ckpt)."""
    run = RunDir(run) if run is not None else RunDir.of_checkpoint(ckpt)
    found = run.saved_configs(project_only=True)
    if not found:
        raise ConfigError(f"no --config given and no configs/*-project.yaml in the run directory {run.root}")
    return Path(found[-1])


def latest_run(logdir: Union[str, Path], name: str) -> Path:
    """Newest `logs/<timestamp>_<name>` directory with a checkpoints/last.ckpt."""
    runs = [Path(p) for p in sorted(glob.glob(str(Path(logdir) / f"*_{name}"))) if checkpoint_exists(RunDir(p).last)]
    if not runs:
        raise FileNotFoundError(f"no finished run named '*_{name}' with checkpoints/last.ckpt under {logdir}")
    return runs[-1]


def resolve_resume(resume: Union[str, Path]) -> tuple[Path, Path, Path]:
    """(checkpoint, config, log dir) for CompVis' `-r/--resume`: a checkpoint file or a log directory.

    A directory holds `model.ckpt` + `config.yaml` (the CompVis model zoo) or `checkpoints/last.ckpt` +
    `configs/*-project.yaml` (a run of main.py); a file takes the config next to it or of its run.
    """
    path = Path(resume)
    if checkpoint_exists(path):
        ckpt = path
        logdir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    elif path.is_dir():
        logdir = path
        candidates = [path / "model.ckpt", RunDir(path).last]
        ckpt = next((c for c in candidates if checkpoint_exists(c)), None)
        if ckpt is None:
            raise FileNotFoundError(f"-r {path}: no checkpoint in it (looked for {candidates[0]} and {candidates[1]})")
    else:
        raise FileNotFoundError(f"-r {path}: no such checkpoint file or log directory")
    for cfg in (ckpt.parent / "config.yaml", logdir / "config.yaml"):
        if cfg.is_file():
            return ckpt, cfg, logdir
    try:
        return ckpt, find_run_config(ckpt, run=logdir), logdir
    except ConfigError:
        raise ConfigError(f"-r {path}: no config next to the checkpoint (looked for {logdir / 'config.yaml'} and "
                          f"{logdir / 'configs'}/*-project.yaml); pass --config") from None


def load_for_sampling(ckpt: Union[str, Path], config: Optional[Union[str, Path]] = None, *, allow_pickle: bool = False,
                      device: Optional[str] = None, overrides: Sequence[str] = (),
                      dtype: Optional[Union[WeightsDType, str, torch.dtype]] = None,
                      kind: Optional[ModelKind] = None) -> tuple[torch.nn.Module, DictConfig]:
    """Model from a run checkpoint; sub-model `ckpt_path`s are dropped (the checkpoint holds all weights).

    `overrides`: dot-list `key=value` settings merged over the config (as CompVis' scripts take them).
    `dtype`: the networks' weights dtype (fp32, bf16, fp16, or auto: the checkpoint's); None keeps float32.
    `kind`: refuse, before anything is built, a config whose model is of another kind (e.g. an autoencoder run
    given to a text-to-image script).
    """
    if not checkpoint_exists(ckpt):
        raise FileNotFoundError(f"checkpoint file not found: {ckpt}")
    config = config if config is not None else find_run_config(ckpt)
    cfg = load_config(config)
    if kind is not None:
        if "model" not in cfg or "target" not in cfg.model:
            raise ConfigError(f"{config}: no model.target to build")
        require_kind(get_obj_from_str(cfg.model.target, key="model.target"), kind,
                     f"the checkpoint {ckpt} (config {config})")
    if overrides:
        bad = [o for o in overrides if "=" not in o or o.startswith("-")]
        if bad:
            raise ConfigError(f"unrecognized arguments: {' '.join(bad)} (config overrides are key=value)")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    target = get_obj_from_str(cfg.model.target, key="model.target") if "model" in cfg and "target" in cfg.model else None
    if getattr(target, "checkpoint_has_all_weights", False) and OmegaConf.select(cfg, "model.params.ckpt_path"):
        cfg.model.params.ckpt_path = None  # a distilled student's run checkpoint holds every weight, teacher's too
    for key in getattr(target, "init_weight_keys", ()):  # weights a run starts from (a video model's image LDM)
        if OmegaConf.select(cfg, f"model.params.{key}"):
            cfg.model.params[key] = None
    for key in ("first_stage_config", "cond_stage_config", "unet_config"):
        sub = OmegaConf.select(cfg, f"model.params.{key}.params")
        if sub is not None and "ckpt_path" in sub.keys():
            sub.ckpt_path = None
    model = load_model_from_config(cfg, ckpt, allow_pickle=allow_pickle, device=device or default_device(), dtype=dtype)
    return model, cfg
