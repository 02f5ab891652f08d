"""Train / test an ldm model from YAML configs, with the CompVis command line on Lightning 2.x.

    python main.py --base configs/autoencoder/shapes_kl_f4.yaml -t
    python main.py --base a.yaml b.yaml -t model.params.base_learning_rate=1e-4 lightning.trainer.max_steps=100
    python main.py -r logs/<run>            # resume at the saved global step, with every config the run saved

Nothing is written until the configs, the trainer keys and (on resume) the checkpoint have been checked; a resume
whose overrides change the model is refused unless --allow-model-changes, and a finished run is not trained on.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ldm.callbacks import ImageLogger, RankSeed, SetupCallback  # noqa: F401  (CompVis paths: main.ImageLogger, ...)
from ldm.checkpoint import (check_sharded_checkpoint, checkpoint_exists, is_sharded_checkpoint, load_checkpoint,
                            load_state_dict_checked)
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset  # noqa: F401  (CompVis import path)
from ldm.errors import USER_ERRORS, report
from ldm.parallel import FSDP, check_shardable, strategy_from_config
from ldm.precision import flush_denormals
from ldm.runs import RunDir, check_trainer_keys, check_value_types, finished, model_changes
from ldm.util import ConfigError, check_no_missing, instantiate_from_config, load_config

logger = logging.getLogger("ldm.main")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("-n", "--name", type=str, default="", help="postfix for the run directory name")
    p.add_argument("-r", "--resume", type=str, default="", help="resume from a log dir or a checkpoint in it")
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="configs merged left to right; trailing `key=value` arguments override them")
    p.add_argument("-t", "--train", action="store_true", help="train")
    p.add_argument("--no-test", action="store_true", help="skip the test run after training")
    p.add_argument("-d", "--debug", action="store_true",
                   help="debug: log at DEBUG level and open a post-mortem debugger on an exception (interactive only)")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    p.add_argument("-f", "--postfix", type=str, default="", help="postfix for the default name")
    p.add_argument("-l", "--logdir", type=str, default="logs", help="directory for logging")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="scale base_learning_rate by accumulate_grad_batches * devices * batch_size (CompVis default: "
                        "on; `--scale_lr false` uses base_learning_rate as it is)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow pickled Python objects in checkpoints (can run code: only for files you trust)")
    p.add_argument("--flush_denormals", type=str2bool, nargs="?", const=True, default=True,
                   help="flush subnormal floats to zero on the CPU (default: on; a step on them runs many times "
                        "slower, and early gradients of saturated attention reach them)")
    p.add_argument("--allow-model-changes", action="store_true",
                   help="-r: accept overrides that change the run's model section (the checkpoint must still fit)")
    return p


def str2bool(v: str) -> bool:
    """CompVis-style boolean flag values: yes/no, true/false, t/f, y/n, 1/0."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false), got '{v}'")


@dataclasses.dataclass
class Run:
    """Where a run lives and what it starts from: a new run, or a resumed one with the configs it saved."""
    logdir: str
    name: str
    ckpt: Optional[str] = None
    saved_configs: tuple[str, ...] = ()
    base: tuple[str, ...] = ()


def resolve_run(opt: argparse.Namespace, now: str) -> Run:
    """The run of the command line: a new directory, or the one of -r (its checkpoint and saved configs)."""
    if opt.name and opt.resume:
        raise ConfigError("-n/--name and -r/--resume cannot be used together: a resumed run keeps its directory")
    if opt.resume:
        path = Path(opt.resume)
        if not path.exists():
            raise ConfigError(f"--resume: cannot find {path}")
        if checkpoint_exists(path):  # a checkpoint file or a sharded checkpoint folder
            parts = path.resolve().parts
            if "checkpoints" not in parts:
                raise ConfigError(f"--resume: {path} is not inside a run's checkpoints/ directory")
            logdir = str(Path(*parts[: parts.index("checkpoints")]))
            ckpt = str(path)
        else:
            logdir = str(path).rstrip("/")
            ckpt = str(RunDir(logdir).last)
            if not checkpoint_exists(ckpt):
                raise ConfigError(f"--resume: {logdir} has no checkpoints/last.ckpt to resume from")
        saved = RunDir(logdir).saved_configs()
        if not any(c.endswith("-project.yaml") for c in saved):
            raise ConfigError(f"--resume: {logdir}/configs has no *-project.yaml to restore the config from")
        # every saved config, oldest first, then any --base given now (then the command line's overrides)
        return Run(logdir, Path(logdir).name, ckpt, tuple(saved), tuple(saved) + tuple(opt.base))
    if opt.name:
        name = "_" + opt.name
    elif opt.base:
        name = "_" + Path(opt.base[0]).stem
    else:
        name = ""
    nowname = now + name + opt.postfix
    return Run(os.path.join(opt.logdir, nowname), nowname, base=tuple(opt.base))


def build_trainer_kwargs(lightning_config: DictConfig, config: DictConfig, model, logdir: str, ckptdir: str,
                         cfgdir: str, now: str, resume: bool) -> dict:
    """Trainer keyword arguments: logger, callbacks (setup, checkpoints, images, lr, signal) and trainer config."""
    from pytorch_lightning.callbacks import ProgressBar

    from ldm.callbacks import CheckpointOnSignal, FinalCheckpoint, LogWhereRead, bounded_progress_bar

    trainer_opts = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True)
    trainer_opts.setdefault("accelerator", "auto")
    trainer_opts.setdefault("devices", 1)
    # CompVis configs name GPUs as `gpus: 0,1`; map it once here.
    gpus = trainer_opts.pop("gpus", None)
    if gpus not in (None, "", 0):
        ids = [int(g) for g in str(gpus).strip(",").split(",") if g.strip() != ""]
        trainer_opts.update(accelerator="gpu", devices=ids)
    # Models with parameters outside some steps' loss (the GAN discriminator before disc_start) need DDP's
    # unused-parameter detection; plain "ddp" would stop at the first step.
    devices = trainer_opts.get("devices")
    several = (isinstance(devices, int) and devices > 1) or (isinstance(devices, (list, tuple)) and len(devices) > 1)
    strategy = trainer_opts.get("strategy", "auto")
    if strategy == "fsdp" or isinstance(strategy, dict):  # FSDP2 on any accelerator (ldm.parallel), or a target
        trainer_opts["strategy"] = strategy_from_config(strategy)
        if isinstance(trainer_opts["strategy"], FSDP):
            check_shardable(model)
    if getattr(model, "ddp_find_unused_parameters", False) and (strategy == "ddp" or (strategy == "auto" and several)):
        trainer_opts["strategy"] = "ddp_find_unused_parameters_true"
        print(f"strategy ddp -> ddp_find_unused_parameters_true ({type(model).__name__} has parameters "
              f"unused in some steps)")

    logger_cfgs = {
        "csv": {"target": "ldm.callbacks.RunCSVLogger",
                "params": {"save_dir": logdir, "name": "csv", "version": ""}},
        "tensorboard": {"target": "pytorch_lightning.loggers.TensorBoardLogger",
                        "params": {"save_dir": logdir, "name": "tensorboard", "version": ""}},
        "wandb": {"target": "pytorch_lightning.loggers.WandbLogger",
                  "params": {"name": Path(logdir).name, "save_dir": logdir, "id": Path(logdir).name,
                             "offline": os.environ.get("WANDB_MODE", "") in ("offline", "disabled")}},
    }
    lg = lightning_config.get("logger", None)
    if lg is None:
        lg_cfgs = [logger_cfgs["csv"]]
    elif isinstance(lg, str):
        lg_cfgs = [logger_cfgs[x.strip()] for x in lg.split(",")]
    elif "target" in lg:
        lg_cfgs = [OmegaConf.merge(logger_cfgs.get(lg.target.split(".")[-1].replace("Logger", "").lower(), {}), lg)]
    else:
        lg_cfgs = [v for v in lg.values()]
    lg_cfgs = [_never_deleting(OmegaConf.create(c) if not isinstance(c, DictConfig) else c) for c in lg_cfgs]
    loggers = [instantiate_from_config(OmegaConf.create(c) if not isinstance(c, DictConfig) else c,
                                       key="lightning.logger") for c in lg_cfgs]

    # last.ckpt is always the newest state: no last-v1.ckpt beside it when a moved or copied run resumes (Lightning then
    # cannot match its own last path and would version the name, and the next `-r` would read the older file)
    ckpt_params = {"dirpath": ckptdir, "filename": "{epoch:06}-{step:09}", "verbose": True, "save_last": True,
                   "enable_version_counter": False}
    monitor = getattr(model, "monitor", None)
    if monitor:
        ckpt_params.update(monitor=monitor, save_top_k=3, mode="min" if "loss" in monitor else "max")
    else:
        ckpt_params.update(save_top_k=0)
    callbacks_cfg = OmegaConf.create({
        "setup_callback": {"target": "ldm.callbacks.SetupCallback",
                           "params": {"resume": resume, "now": now, "logdir": logdir, "ckptdir": ckptdir,
                                      "cfgdir": cfgdir}},
        "checkpoint_callback": {"target": "pytorch_lightning.callbacks.ModelCheckpoint", "params": ckpt_params},
        "image_logger": {"target": "ldm.callbacks.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
    })
    user_cbs = lightning_config.get("callbacks", OmegaConf.create())
    callbacks_cfg = OmegaConf.merge(callbacks_cfg, user_cbs)
    callbacks = []
    for k, c in callbacks_cfg.items():
        if c is None or c.get("target") is None:
            continue
        if k == "setup_callback":
            callbacks.append(instantiate_from_config(c, key=f"lightning.callbacks.{k}",
                                                     extra_params={"config": config,
                                                                   "lightning_config": lightning_config}))
        else:
            callbacks.append(instantiate_from_config(c, key=f"lightning.callbacks.{k}"))
    callbacks.append(CheckpointOnSignal(str(RunDir(logdir).last)))
    callbacks.append(LogWhereRead())  # the module logs its step scalars only where they are read
    if OmegaConf.select(callbacks_cfg, "checkpoint_callback.params.save_last", default=False):
        callbacks.append(FinalCheckpoint(str(RunDir(logdir).last)))  # only where last.ckpt is wanted
    if trainer_opts.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(bounded_progress_bar())  # an epoch total under max_steps / max_time too
    trainer_opts.update(logger=loggers, callbacks=callbacks, default_root_dir=logdir)
    return trainer_opts


# Lightning's CSV loggers delete an existing metrics.csv; RunCSVLogger (same parameters) continues it.
LIGHTNING_CSV_LOGGERS = ("pytorch_lightning.loggers.CSVLogger", "lightning.pytorch.loggers.CSVLogger",
                         "pytorch_lightning.loggers.csv_logs.CSVLogger")


def _never_deleting(cfg: DictConfig) -> DictConfig:
    """A logger config with Lightning's CSVLogger replaced by RunCSVLogger, which never deletes a run's metrics."""
    if cfg.get("target") in LIGHTNING_CSV_LOGGERS:
        cfg = OmegaConf.merge(cfg, {"target": "ldm.callbacks.RunCSVLogger"})
    return cfg


def set_learning_rate(model, config: DictConfig, trainer, scale_lr: bool) -> None:
    """Effective learning rate, printed with its formula (scaled unless `--scale_lr false`, as CompVis)."""
    base_lr = float(config.model.get("base_learning_rate", 1e-4))
    bs = int(config.data.params.batch_size) if "params" in config.data else 1
    accumulate = int(trainer.accumulate_grad_batches)
    nodes, devices = int(trainer.num_nodes), int(trainer.num_devices)
    say = print if trainer.global_rank == 0 else (lambda *a, **k: None)  # once per run, not once per process
    if scale_lr:
        model.learning_rate = accumulate * nodes * devices * bs * base_lr
        say(f"Setting learning rate to {model.learning_rate:.2e} = {accumulate} (accumulate_grad_batches) * "
            f"{nodes} (num_nodes) * {devices} (devices per node) * {bs} (batchsize) * {base_lr:.2e} (base_lr)")
    else:
        model.learning_rate = base_lr
        say(f"++++ NOT USING LR SCALING (--scale_lr false) ++++\nSetting learning rate to {model.learning_rate:.2e} "
            f"= {base_lr:.2e} (base_lr)")


def main(argv: Optional[list[str]] = None) -> int:
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    sys.path.append(os.getcwd())
    parser = get_parser()
    opt, unknown = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if opt.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if opt.flush_denormals and not flush_denormals():  # before any parallel op starts torch's thread pool
        logger.info("subnormal floats are not flushed to zero in every CPU thread (the CPU cannot, or torch's thread "
                    "pool started before main.py ran); CPU steps on them run slower")
    bad = [u for u in unknown if "=" not in u]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are written key=value)")
    try:
        run = resolve_run(opt, now)
        if not run.base:
            raise ConfigError("no config given: use --base CONFIG.yaml (or -r LOGDIR to resume)")
        config = OmegaConf.merge(load_config(run.base), OmegaConf.from_dotlist(unknown))
        check_no_missing(config, what="config")
        for key in ("model", "data"):
            if key not in config:
                raise ConfigError(f"config has no `{key}:` section (files: {', '.join(run.base)})")
        lightning_config = config.pop("lightning", OmegaConf.create())
        check_trainer_keys(lightning_config)
        check_value_types(config)
        resume = None
        if run.ckpt:  # nothing of the run is touched before its checkpoint is known to fit the new config
            changes = model_changes(load_config([c for c in run.saved_configs if c.endswith("-project.yaml")]), config)
            if changes and not opt.allow_model_changes:
                raise ConfigError(f"-r {opt.resume}: the command line changes the run's model section "
                                  f"({'; '.join(changes[:8])}{'; ...' if len(changes) > 8 else ''}). The run is left as "
                                  f"it is. Start a new run from its checkpoint (model.params.ckpt_path=...), or pass "
                                  f"--allow-model-changes if the checkpoint still fits")
            resume = load_checkpoint(run.ckpt, allow_pickle=opt.unsafe_load)
            if is_sharded_checkpoint(run.ckpt) and not opt.unsafe_load:
                check_sharded_checkpoint(run.ckpt)  # Lightning's reader unpickles without restriction
            why = finished(resume, lightning_config.get("trainer", OmegaConf.create())) if opt.train else None
            if why:
                print(f"{run.logdir} has finished training: {why}. Nothing to do; raise it on the command line to "
                      f"train on (e.g. lightning.trainer.max_steps=N)")
                return 0
    except USER_ERRORS as e:
        return report(e)

    import pytorch_lightning as pl

    layout = RunDir(run.logdir)
    logdir, ckptdir, cfgdir = run.logdir, str(layout.checkpoints), str(layout.configs)
    pl.seed_everything(opt.seed, workers=True)
    trainer = None
    try:
        model = instantiate_from_config(config.model, key="model")
        if resume is not None:
            load_state_dict_checked(model, resume, strict=True, source=run.ckpt)
            resume = None  # the trainer reads the file again; free this copy
        data = instantiate_from_config(config.data, key="data")
        data.prepare_data()
        data.setup()
        for k, ds in data.datasets.items():
            print(f"{k:<10} {ds.__class__.__name__:<24} {len(ds)} items")
        trainer_kwargs = build_trainer_kwargs(lightning_config, config, model, logdir, ckptdir, cfgdir, now,
                                              resume=bool(run.ckpt))
        trainer_kwargs["callbacks"] = list(trainer_kwargs.get("callbacks") or []) + [RankSeed(opt.seed)]
        trainer = pl.Trainer(**trainer_kwargs)
        set_learning_rate(model, config, trainer, opt.scale_lr)
    except USER_ERRORS as e:
        return report(e)
    resume_ckpt = run.ckpt

    def save_on_exception() -> None:
        """Write last.ckpt when training stops on an exception, so no work is lost."""
        if trainer is not None and trainer.global_rank == 0 and trainer.global_step > 0:
            path = str(layout.last)
            print(f"Summoning checkpoint: saving {path}", file=sys.stderr)
            trainer.save_checkpoint(path, weights_only=False)

    try:
        if opt.train:
            try:
                trainer.fit(model, datamodule=data, ckpt_path=resume_ckpt, weights_only=not opt.unsafe_load)
            except Exception:
                save_on_exception()
                raise
        if not opt.no_test and not trainer.interrupted and "test" in data.dataset_configs:
            trainer.test(model, datamodule=data)
    except Exception:
        if opt.debug and sys.stdin.isatty():
            import pdb
            pdb.post_mortem()
        raise
    finally:
        if trainer is not None and trainer.global_rank == 0 and os.path.isdir(logdir):
            print(f"Run directory: {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
