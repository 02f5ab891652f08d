"""Sample a text-to-image LDM: CompVis flags, one PNG per sample (with metadata) plus a grid.

    python scripts/txt2img.py --prompt "a large blue triangle in the top left" --ckpt logs/<run>/checkpoints/last.ckpt
    python scripts/txt2img.py --from-file prompts.txt --n_samples 1 --ckpt ... --sampler dpmpp_2m --ddim_steps 20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

from ldm.checkpoint import CheckpointError
from ldm.inference import Precision, file_hash, first_stage_factor, load_for_sampling, sample_prompts, save_png, to_uint8
from ldm.sampling import SAMPLERS
from ldm.util import ConfigError


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=str, default="a large blue triangle in the top left")
    p.add_argument("--from-file", type=str, help="one prompt per line")
    p.add_argument("--outdir", type=str, default="outputs/txt2img-samples")
    p.add_argument("--n_samples", type=int, default=4, help="samples per prompt (the batch size)")
    p.add_argument("--n_iter", type=int, default=1, help="sampling rounds")
    p.add_argument("--ddim_steps", type=int, default=50, help="sampling steps (any sampler)")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: the model's guidance_scale)")
    p.add_argument("--H", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--config", type=str, default=None, help="default: the run's configs/*-project.yaml")
    p.add_argument("--ckpt", type=str, required=True)
    p.add_argument("--plms", action="store_true", help="use PLMS (same as --sampler plms)")
    p.add_argument("--sampler", type=str, default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--no-ema", action="store_true", help="sample with the training weights, not the EMA ones")
    p.add_argument("--unsafe-load", action="store_true", help="allow pickled objects in the checkpoint")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=[x.value for x in Precision],
                   help="sampling precision (autocast: float16 on CUDA, bfloat16 on CPU; full = fp32)")
    return p


def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    sampler = "plms" if opt.plms else opt.sampler
    try:
        model, _ = load_for_sampling(opt.ckpt, opt.config, allow_pickle=opt.unsafe_load, device=opt.device)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    f = first_stage_factor(model)
    native = model.image_size * f
    if (opt.H or native) != native or (opt.W or native) != native:
        print(f"error: this model samples {native}x{native} images; --H/--W {opt.H}x{opt.W} are not supported",
              file=sys.stderr)
        return 2
    scale = model.guidance_scale if opt.scale is None else opt.scale
    if opt.from_file:
        lines = [ln.strip() for ln in Path(opt.from_file).read_text().splitlines() if ln.strip()]
        batches = [[ln] * opt.n_samples for ln in lines]
    else:
        batches = [[opt.prompt] * opt.n_samples]
    out = Path(opt.outdir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    count = len(list((out / "samples").glob("*.png")))
    ckpt_hash = file_hash(opt.ckpt)
    all_images = []
    jobs = [(it, b) for it in range(opt.n_iter) for b in batches]
    for k, (it, prompts) in enumerate(tqdm(jobs, desc="sampling")):
        seed = opt.seed + k
        images = sample_prompts(model, prompts, steps=opt.ddim_steps, sampler=sampler, scale=scale, seed=seed,
                                eta=opt.ddim_eta, use_ema=not opt.no_ema, precision=opt.precision)
        for i, arr in enumerate(to_uint8(images)):
            save_png(arr, out / "samples" / f"{count:05}.png",
                     {"prompt": prompts[i], "seed": seed, "index_in_batch": i, "sampler": sampler,
                      "steps": opt.ddim_steps, "scale": scale, "eta": opt.ddim_eta, "ckpt": opt.ckpt,
                      "ckpt_sha256": ckpt_hash})
            count += 1
        all_images.append(images)
    grid = torchvision.utils.make_grid(torch.cat(all_images), nrow=max(opt.n_samples, 8 if opt.n_samples == 1 else 1))
    grid_count = len(list(out.glob("grid-*.png")))
    save_png(to_uint8(grid[None])[0], out / f"grid-{grid_count:04}.png",
             {"prompts": " | ".join(b[0] for b in batches), "sampler": sampler, "steps": opt.ddim_steps, "scale": scale,
              "seed": opt.seed, "ckpt_sha256": ckpt_hash})
    print(f"Your samples are ready and waiting for you here: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
