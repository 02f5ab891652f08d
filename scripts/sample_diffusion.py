"""Sample an unconditional or class-conditional LDM with the flags and output layout of CompVis'
scripts/sample_diffusion.py: PNGs plus one .npz (uint8 NHWC) for metrics.

    python scripts/sample_diffusion.py -r logs/<run> -n 64 -c 50 -e 0.0
    python scripts/sample_diffusion.py -r models/ldm/celeba256/model.ckpt -n 50000 --batch_size 50 -l outputs
    python scripts/sample_diffusion.py --ckpt logs/<run>/checkpoints/last.ckpt -n 16 --sampler heun --class_label 3

-r takes a log directory (model.ckpt + config.yaml, or a main.py run: checkpoints/last.ckpt + configs/) or a
checkpoint file (config next to it). Extra `key=value` arguments override the config. Output:
<logdir>/samples/<global step, 8 digits>/<date-time>/{img/sample_NNNNNN.png, numpy/<N>x<H>x<W>x<C>-samples.npz,
sampling_config.yaml}, where <logdir> is the run's directory, or -l/--logdir/<run name>.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ldm import generation
from ldm.checkpoint import ModelKind
from ldm.cli import (UsageError, add_compile_argument, add_generation_arguments, add_lora_argument,
                     add_precision_arguments, apply_compile, apply_loras, check_lora_files, check_options, latent_shape,
                     precision)
from ldm.errors import entry_point
from ldm.files import file_hash, save_png, to_uint8
from ldm.generation import generators, image_seeds, reads, sampling_scope
from ldm.modules.model_inputs import ConditionInput
from ldm.runs import load_for_sampling, resolve_resume
from ldm.sampling import SAMPLERS
from ldm.sampling.registry import sampler_info

COMPVIS_ETA = 1.0  # CompVis' default DDIM eta for this script (stochastic DDIM)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    src = p.add_argument_group("model (one of -r or --ckpt)")
    src.add_argument("-r", "--resume", type=str, default=None, help="log directory or checkpoint in it")
    src.add_argument("--ckpt", type=str, default=None, help="a checkpoint (config: --config or its run's)")
    src.add_argument("--config", type=str, default=None)
    src.add_argument("--unsafe-load", action="store_true", help="allow pickled objects in the checkpoint")
    src.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_precision_arguments(src)
    add_lora_argument(src)
    add_compile_argument(src)
    g = p.add_argument_group("sampling (CompVis flags)")
    g.add_argument("-n", "--n_samples", type=int, default=50000, help="number of samples to draw")
    g.add_argument("-e", "--eta", type=float, default=None,
                   help=f"eta of DDIM (default {COMPVIS_ETA}, as CompVis; 0.0: deterministic) or of another sampler")
    g.add_argument("-v", "--vanilla_sample", action="store_true",
                   help="ancestral DDPM sampling over all the model's timesteps instead of DDIM")
    g.add_argument("-c", "--custom_steps", type=int, default=50, help="sampling steps (DDIM or --sampler)")
    g.add_argument("-l", "--logdir", type=str, default="none", help="write under <logdir>/<run name> instead")
    g.add_argument("--batch_size", type=int, default=10)
    ours = p.add_argument_group("sampling (this framework)")
    ours.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: ddim (ddpm with -v)")
    add_generation_arguments(ours)  # --spacing, --guidance_rescale
    ours.add_argument("--seed", type=int, default=0, help="sample k uses seed + k")
    ours.add_argument("--class_label", type=int, default=None,
                      help="class-conditional models: this class (default: classes in turn, balanced)")
    ours.add_argument("--scale", type=float, default=None, help="guidance scale for class-conditional models")
    ours.add_argument("--H", type=int, default=None, help="image height (default: the model's)")
    ours.add_argument("--W", type=int, default=None, help="image width (default: the model's)")
    return p


def sampler_and_steps(opt, model) -> tuple[str, int, dict]:
    """(sampler, steps, options): -v is ancestral DDPM over every timestep; otherwise DDIM with eta (or --sampler)."""
    if opt.vanilla_sample:
        if opt.sampler not in (None, "ddpm"):
            raise UsageError(f"-v/--vanilla_sample is DDPM sampling; it conflicts with --sampler {opt.sampler}")
        return "ddpm", model.num_timesteps, {}
    sampler = opt.sampler or getattr(model, "sampler_name", "ddim")
    if opt.eta is not None and not sampler_info(sampler).takes_eta:
        raise UsageError(f"-e/--eta {opt.eta}: sampler '{sampler}' has no eta")
    eta = COMPVIS_ETA if opt.eta is None and sampler == "ddim" else opt.eta
    return sampler, opt.custom_steps, ({"eta": eta} if eta else {})


def output_dirs(logdir: Path, opt, step) -> Path:
    """<logdir or -l/<run name>>/samples/<step:08>/<now>, as CompVis; never an existing folder."""
    if opt.logdir != "none":
        logdir = Path(opt.logdir) / logdir.resolve().name
    now = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    folder = logdir / "samples" / f"{int(step or 0):08}" / now
    k = 1
    while folder.exists():  # a second run within the same second gets its own folder
        folder = folder.with_name(f"{now}-{k}")
        k += 1
    return folder


@entry_point
def main(argv=None) -> int:
    opt, unknown = get_parser().parse_known_args(argv)
    check_options(opt)
    if (opt.resume is None) == (opt.ckpt is None):
        raise UsageError("give one of -r/--resume (log directory or checkpoint) or --ckpt")
    if opt.resume is not None:
        ckpt, config, logdir = resolve_resume(opt.resume)
        config = opt.config or config
    else:
        ckpt, config = Path(opt.ckpt), opt.config
        logdir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    check_lora_files(opt.lora)
    model, cfg = load_for_sampling(ckpt, config, allow_pickle=opt.unsafe_load, device=opt.device,
                                   overrides=unknown, dtype=opt.dtype, kind=ModelKind.DIFFUSION)
    apply_loras(model, opt.lora)
    apply_compile(model, opt)
    sampler, steps, options = sampler_and_steps(opt, model)
    shape = latent_shape(model, opt.H, opt.W)
    prec = precision(opt)
    conditional = bool(model.condition_inputs)
    if conditional and not reads(model, ConditionInput.LABELS):
        raise UsageError("this model is neither unconditional nor class-conditional; use scripts/txt2img.py")
    scale = (model.guidance_scale if opt.scale is None else opt.scale) if conditional else 1.0
    run_dir = output_dirs(logdir, opt, getattr(model, "ckpt_global_step", None))
    img_dir, np_dir = run_dir / "img", run_dir / "numpy"
    img_dir.mkdir(parents=True, exist_ok=True)
    np_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(opt).items()} | {"ckpt_used": str(ckpt), "config_used": str(config),
                                                       "overrides": list(unknown), "sampler_used": sampler,
                                                       "steps_used": steps, "scale_used": scale}
    (run_dir / "sampling_config.yaml").write_text(yaml.safe_dump(settings, sort_keys=True))
    print(f"logging to {run_dir}")
    h, done, arrays = file_hash(ckpt), 0, []
    with tqdm(total=opt.n_samples, desc=f"sampling ({sampler}, {steps} steps)") as bar:
        while done < opt.n_samples:
            bs = min(opt.batch_size, opt.n_samples - done)
            seeds = image_seeds(opt.seed, done, bs)
            labels = None
            if conditional:
                n_cls = model.cond_stage_model.n_classes
                labels = (torch.full((bs,), opt.class_label) if opt.class_label is not None
                          else torch.arange(done, done + bs) % n_cls).to(model.device)
            with sampling_scope(model, True, prec):
                cond = model.conditioning(labels=labels, guidance=generation.needs_unconditional(model, scale))
                imgs = to_uint8(generation.generate(model, cond, bs, steps=steps, sampler=sampler, scale=scale,
                                                    generator=generators(seeds, model.device), shape=shape,
                                                    spacing=opt.spacing, rescale=opt.guidance_rescale, **options))
            for i, a in enumerate(imgs):
                meta = {"seed": seeds[i], "sampler": sampler, "steps": steps, "scale": scale, "ckpt_sha256": h}
                if labels is not None:
                    meta["class_label"] = int(labels[i])
                save_png(a, img_dir / f"sample_{done + i:06}.png", meta)
            arrays.append(imgs)
            done += bs
            bar.update(bs)
    all_img = np.concatenate(arrays)
    np.savez(np_dir / f"{'x'.join(map(str, all_img.shape))}-samples.npz", all_img)
    print(f"wrote {done} samples to {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
