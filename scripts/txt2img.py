"""Text-to-image sampling with the flags of the CompVis (SD v1) and Stable Diffusion v2 scripts.

    python scripts/txt2img.py --prompt "a large blue triangle in the top left" --ckpt logs/<run>/checkpoints/last.ckpt
    python scripts/txt2img.py --config configs/stable-diffusion/v1-inference.yaml --ckpt sd-v1-4.ckpt \\
        --prompt "a watercolor of a lighthouse" --H 512 --W 768 --n_samples 2 --n_iter 2 --plms
    python scripts/txt2img.py --from-file prompts.txt --n_samples 1 --ckpt ... --sampler dpmpp_2m --steps 20

Writes <outdir>/samples/NNNNN.png (numbering continues what is there; PNG text carries prompt, seed, sampler,
steps, scale and the checkpoint hash) and <outdir>/grid-NNNN.png. Image k of a run uses seed + k, so a seed
gives the same images whatever the --n_samples / --n_iter split.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ldm.cli import (add_model_arguments, add_output_arguments, add_prompt_arguments, add_sampling_arguments,
                     check_options, guidance_scale, latent_shape, load_from_arguments, next_number, precision,
                     prompt_batches, sampler_name, write_grid)
from ldm.errors import entry_point
from ldm.files import check_output_folder, file_hash, save_png, to_uint8
from ldm.generation import generators, image_seeds, sample_prompts, start_noise
from ldm.sampling.registry import eta_option

SD_V1_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
SD_V1_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
LAION400M = {"config": "configs/ldm/txt2img-1p4B.yaml", "ckpt": "models/ldm/text2img-large/model.ckpt",
             "outdir": "outputs/txt2img-samples-laion400m"}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_prompt_arguments(p, default="a large blue triangle in the top left")
    add_sampling_arguments(p, n_samples=3, n_iter=1, scale=None)
    add_output_arguments(p, "outputs/txt2img-samples")
    add_model_arguments(p, default_ckpt=SD_V1_CKPT, default_config=SD_V1_CONFIG)
    p.add_argument("--laion400m", action="store_true",
                   help=f"the LDM-KL-8-G text-to-image model: --config {LAION400M['config']} --ckpt {LAION400M['ckpt']}")
    return p


@entry_point
def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    if opt.laion400m:
        opt.config, opt.ckpt, opt.outdir = LAION400M["config"], LAION400M["ckpt"], LAION400M["outdir"]
    check_options(opt)
    sampler, prec = sampler_name(opt), precision(opt)
    eta_option(sampler, opt.ddim_eta)  # a --ddim_eta the sampler cannot take is refused before any work
    batches = prompt_batches(opt)
    check_output_folder(Path(opt.outdir) / "samples", "--outdir")  # numbered files never replace any
    model, cfg = load_from_arguments(opt, SD_V1_CKPT, SD_V1_CONFIG)
    sampler, opt.spacing = sampler_name(opt, model), opt.spacing or model.sample_spacing  # the model's defaults
    eta_option(sampler, opt.ddim_eta)
    shape = latent_shape(model, opt.H, opt.W, opt.C, opt.f)
    scale = guidance_scale(opt, cfg, model)
    out = Path(opt.outdir)
    samples_dir = out / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    count = next_number(samples_dir, r"(\d+)\.png")
    ckpt_hash = file_hash(opt.ckpt)
    fixed = (start_noise(opt.n_samples, shape, model.device, generators(image_seeds(opt.seed, 0, opt.n_samples),
                                                                         model.device)) if opt.fixed_code else None)
    images, captions, k = [], [], 0
    jobs = [prompts for _ in range(opt.n_iter) for prompts in batches]
    for prompts in tqdm(jobs, desc="sampling"):
        seeds = image_seeds(opt.seed, k, len(prompts))
        x_T = fixed[: len(prompts)] if fixed is not None else None
        batch = to_uint8(sample_prompts(model, prompts, steps=opt.steps, sampler=sampler, scale=scale, seed=seeds,
                                        eta=opt.ddim_eta, use_ema=not opt.no_ema, precision=prec, shape=shape,
                                        x_T=x_T, spacing=opt.spacing, rescale=opt.guidance_rescale))
        for i, arr in enumerate(batch):
            if not opt.skip_save:
                save_png(arr, samples_dir / f"{count:05}.png",
                         {"prompt": prompts[i], "seed": seeds[i], "fixed_code": opt.fixed_code, "sampler": sampler,
                          "spacing": opt.spacing, "steps": opt.steps, "scale": scale, "eta": opt.ddim_eta,
                          "H": batch.shape[1], "W": batch.shape[2], "ckpt": opt.ckpt, "ckpt_sha256": ckpt_hash})
                count += 1
        k += len(prompts)
        images.append(batch)
        captions += prompts
    if not opt.skip_grid:
        write_grid(out, images, captions, opt, {"sampler": sampler, "steps": opt.steps, "scale": scale,
                                                "ckpt_sha256": ckpt_hash})
    print(f"Your samples are ready and waiting for you here: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
