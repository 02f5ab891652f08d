"""Image-to-image (SDEdit) with the flags of the CompVis / Stable Diffusion img2img script: encode --init-img,
noise it to --strength, denoise towards the prompt.

    python scripts/img2img.py --init-img in.png --prompt "a large red circle in the center" --strength 0.6 --ckpt ...
    python scripts/img2img.py --config configs/stable-diffusion/v1-inference.yaml --ckpt sd-v1-4.ckpt \\
        --init-img sketch.png --prompt "a fantasy landscape" --strength 0.75 --n_samples 2 --n_iter 2

The input keeps its size rounded down to a multiple of the first stage's factor, unless --H/--W resize it.
Image k of a run uses seed + k; --fixed_code gives every iteration the same noise. Output layout as txt2img.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ldm.cli import (UsageError, add_model_arguments, add_output_arguments, add_prompt_arguments,
                     add_sampling_arguments, check_options, guidance_scale, latent_shape, load_from_arguments,
                     next_number, precision, prompt_batches, sampler_name, write_grid)
from ldm.errors import entry_point
from ldm.files import check_output_folder, file_hash, load_image, save_png, to_uint8
from ldm.generation import first_stage_factor, image_seeds, img2img
from ldm.sampling.registry import eta_option

SD_V1_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
SD_V1_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
SD_IMG2IMG_SCALE = 5.0  # the SD v1 img2img script's default guidance scale


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--init-img", type=str, required=True, help="path to the input image")
    p.add_argument("--strength", type=float, default=0.75,
                   help="noise added to the input, in (0, 1]: 1 ignores it, small values keep it")
    add_prompt_arguments(p, default=None)
    add_sampling_arguments(p, n_samples=2, n_iter=1, scale=None)
    add_output_arguments(p, "outputs/img2img-samples")
    add_model_arguments(p, default_ckpt=SD_V1_CKPT, default_config=SD_V1_CONFIG)
    return p


def init_image(path: str, model, H, W) -> torch.Tensor:
    """The input as (1, 3, H, W) in [-1, 1]: resized to --H/--W, else cropped down to a multiple of the factor."""
    x = load_image(path)
    f = first_stage_factor(model)
    if H or W:
        _, h, w = latent_shape(model, H or x.shape[2] // f * f, W or x.shape[3] // f * f)
        return F.interpolate(x, size=(h * f, w * f), mode="bicubic", align_corners=False).clamp(-1, 1)
    h, w = x.shape[2] // f * f, x.shape[3] // f * f
    if not (h and w):
        raise UsageError(f"--init-img {path} is {x.shape[3]}x{x.shape[2]}, smaller than the factor {f}")
    return x[:, :, :h, :w]


@entry_point
def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    check_options(opt)
    if not 0.0 < opt.strength <= 1.0:
        raise UsageError(f"--strength must lie in (0, 1], got {opt.strength}")
    if opt.prompt is None and not opt.from_file:
        raise UsageError("give --prompt or --from-file")
    sampler, prec = sampler_name(opt), precision(opt)
    eta_option(sampler, opt.ddim_eta)  # a --ddim_eta the sampler cannot take is refused before any work
    batches = prompt_batches(opt)
    load_image(opt.init_img)  # a missing or unreadable --init-img is refused before the model is loaded
    check_output_folder(Path(opt.outdir) / "samples", "--outdir")  # numbered files never replace any
    model, cfg = load_from_arguments(opt, SD_V1_CKPT, SD_V1_CONFIG)
    sampler, opt.spacing = sampler_name(opt, model), opt.spacing or model.sample_spacing  # the model's defaults
    eta_option(sampler, opt.ddim_eta)
    latent_shape(model, None, None, opt.C, opt.f)
    x = init_image(opt.init_img, model, opt.H, opt.W)
    scale = guidance_scale(opt, cfg, model, fallback=SD_IMG2IMG_SCALE)
    out = Path(opt.outdir)
    samples_dir = out / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    count, h = next_number(samples_dir, r"(\d+)\.png"), file_hash(opt.ckpt)
    images, captions, k = [], [], 0
    for prompts in tqdm([b for _ in range(opt.n_iter) for b in batches], desc="img2img"):
        seeds = image_seeds(opt.seed, 0 if opt.fixed_code else k, len(prompts))
        batch = to_uint8(img2img(model, x.repeat(len(prompts), 1, 1, 1), prompts, strength=opt.strength,
                                 steps=opt.steps, sampler=sampler, scale=scale, seed=seeds, use_ema=not opt.no_ema,
                                 precision=prec, eta=opt.ddim_eta, spacing=opt.spacing,
                                 rescale=opt.guidance_rescale))
        for i, a in enumerate(batch):
            if not opt.skip_save:
                save_png(a, samples_dir / f"{count:05}.png",
                         {"prompt": prompts[i], "init_img": opt.init_img, "strength": opt.strength, "seed": seeds[i],
                          "sampler": sampler, "spacing": opt.spacing, "steps": opt.steps, "scale": scale,
                          "eta": opt.ddim_eta, "ckpt_sha256": h})
                count += 1
        k += len(prompts)
        images.append(batch)
        captions += prompts
    if not opt.skip_grid:
        write_grid(out, images, captions, opt, {"strength": opt.strength, "sampler": sampler, "ckpt_sha256": h})
    print(f"Your samples are ready and waiting for you here: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
