"""DreamBooth (Ruiz et al. 2023) fine-tuning of a trained text-to-image LDM through main.py, with LoRA adapters (the
default) or in full: the base model makes the class images first (cached: only the missing ones are made), then
instance and class images train together under the prior-preservation loss.

    python scripts/dreambooth.py --ckpt logs/<run>/checkpoints/last.ckpt --instance_dir my_dog/ \\
        --instance_prompt "a photo of sks dog" --class_prompt "a photo of a dog" --class_dir class_dog/ \\
        --num_class_images 100 --max_steps 400 [--full] [main.py key=value overrides]

The run is a main.py run (logs/<time>_<name>/): resume it with `main.py -r`, sample it with any script's --ckpt,
share its adapters with `scripts/convert.py --ckpt <run>/checkpoints/last.ckpt --lora-out FILE`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.cli import UsageError, add_sampler_choice, check_options, sampler_name  # noqa: E402
from ldm.data.folder import IMAGE_EXTENSIONS, scan_images  # noqa: E402
from ldm.errors import entry_point  # noqa: E402
from ldm.files import save_png, to_uint8  # noqa: E402
from ldm.generation import image_seeds, sample_prompts  # noqa: E402
from ldm.runs import find_run_config, load_for_sampling  # noqa: E402
from ldm.util import load_config  # noqa: E402

CLASS_IMAGE = "class_{:05}.png"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="the trained model to fine-tune")
    p.add_argument("--config", default=None, help="its config (default: the run's configs/*-project.yaml)")
    p.add_argument("--instance_dir", required=True, help="the subject's images (a few)")
    p.add_argument("--instance_prompt", required=True, help="prompt with the identifier, e.g. 'a photo of sks dog'")
    p.add_argument("--class_prompt", default=None, help="the class, e.g. 'a photo of a dog' (prior preservation)")
    p.add_argument("--class_dir", default=None, help="class images: made here by the base model when missing")
    p.add_argument("--num_class_images", type=int, default=100)
    p.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the class images' loss")
    p.add_argument("--full", action="store_true", help="fine-tune the whole UNet instead of LoRA adapters")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--max_steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=1, help="instance images per batch (as many class images join)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the config's)")
    p.add_argument("--logdir", default="logs")
    p.add_argument("--name", default="dreambooth")
    p.add_argument("--seed", type=int, default=0, help="class image k uses seed + k")
    p.add_argument("--scale", type=float, default=None, help="guidance scale of the class images (default: the "
                                                              "model's)")
    p.add_argument("--sample_batch", type=int, default=4, help="class images made at once")
    add_sampler_choice(p, steps=50)
    return p


def class_images(folder: Path) -> list[Path]:
    return scan_images(folder, IMAGE_EXTENSIONS) if folder.is_dir() else []


def make_class_images(opt, config: Path) -> int:
    """The missing class images (numbered, seed + k for image k), made by the base model; returns how many."""
    folder = Path(opt.class_dir)
    have = len(class_images(folder))
    if have >= opt.num_class_images:
        return 0
    model, _ = load_for_sampling(opt.ckpt, config)
    scale = model.guidance_scale if opt.scale is None else opt.scale
    folder.mkdir(parents=True, exist_ok=True)
    made, k = 0, 0
    while have + made < opt.num_class_images:
        while (folder / CLASS_IMAGE.format(k)).exists():
            k += 1
        n = min(opt.sample_batch, opt.num_class_images - have - made)
        seeds = image_seeds(opt.seed, k, n)
        images = to_uint8(sample_prompts(model, [opt.class_prompt] * n, steps=opt.steps, sampler=sampler_name(opt),
                                         scale=scale, seed=seeds))
        for j, image in enumerate(images):
            save_png(image, folder / CLASS_IMAGE.format(k + j), {"prompt": opt.class_prompt, "seed": seeds[j],
                                                                 "ckpt": opt.ckpt})
        made, k = made + n, k + n
    print(f"made {made} class images in {folder} ({have} were there)")
    return made


def run_config(opt, config: Path):
    """The base config with the base weights, LoRA (unless --full), the prior weight and the DreamBooth data."""
    cfg = load_config(config)
    params = cfg.model.params
    params.ckpt_path = str(opt.ckpt)
    for key in ("first_stage_config", "cond_stage_config"):  # the checkpoint holds every weight
        sub = params.get(key)
        if OmegaConf.is_dict(sub) and "params" in sub and "ckpt_path" in sub.params:
            sub.params.ckpt_path = None
    if not opt.full:
        params.lora_config = {"rank": opt.rank, "alpha": opt.alpha if opt.alpha is not None else opt.rank}
    params.prior_loss_weight = opt.prior_loss_weight
    if opt.lr is not None:
        cfg.model.base_learning_rate = opt.lr
    side = int(params.get("image_size", 64)) * first_stage_factor_of(cfg)
    dataset = {"instance_dir": str(opt.instance_dir), "instance_prompt": opt.instance_prompt, "size": side,
               "image_key": params.get("first_stage_key", "image"), "caption_key": params.get("cond_stage_key",
                                                                                              "caption")}
    if opt.class_prompt:
        dataset |= {"class_dir": str(opt.class_dir), "class_prompt": opt.class_prompt,
                    "min_class_images": opt.num_class_images}
    cfg.data = OmegaConf.create({"target": "main.DataModuleFromConfig", "params": {
        "batch_size": opt.batch_size, "num_workers": 0,
        "train": {"target": "ldm.data.dreambooth.DreamBoothDataset", "params": dataset}}})
    cfg.lightning = OmegaConf.create({"trainer": {"max_steps": opt.max_steps, "num_sanity_val_steps": 0}})
    return cfg


def first_stage_factor_of(cfg) -> int:
    """The first stage's downsampling factor from its config (2 ** (levels - 1))."""
    dd = OmegaConf.select(cfg, "model.params.first_stage_config.params.ddconfig")
    return 2 ** (len(dd.ch_mult) - 1) if dd is not None and "ch_mult" in dd else 1


@entry_point
def main(argv=None) -> int:
    opt, overrides = get_parser().parse_known_args(argv)
    check_options(opt)
    for flag, path in (("--ckpt", opt.ckpt), ("--config", opt.config)):
        if path and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if not Path(opt.instance_dir).is_dir():
        raise UsageError(f"--instance_dir {opt.instance_dir}: no such folder")
    if bool(opt.class_prompt) != bool(opt.class_dir):
        raise UsageError("prior preservation needs both --class_prompt and --class_dir (or neither)")
    config = Path(opt.config) if opt.config else find_run_config(opt.ckpt)
    if opt.class_prompt:
        make_class_images(opt, config)
    cfg = run_config(opt, config)
    logdir = Path(opt.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    path = logdir / f"dreambooth-{opt.name}.yaml"
    OmegaConf.save(cfg, path)
    import main as main_mod
    return main_mod.main(["--base", str(path), "-t", "-n", opt.name, "-l", str(logdir), *overrides])


if __name__ == "__main__":
    sys.exit(main())
