"""4x super-resolution of every image in --indir, written to --outdir with the same name.

    python scripts/superres.py --indir lowres/ --outdir outputs/superres --steps 100
    python scripts/superres.py --indir in/ --outdir out/ --ckpt logs/<run>/checkpoints/last.ckpt --steps 50
    python scripts/superres.py --indir in/ --outdir out/ --config x4-upscaling.yaml --ckpt x4-upscaler-ema.ckpt \
        --noise_level 20 --prompt "a photo"

Models: the paper's LDM-SR / BSR (LatentDiffusion with the low-resolution image concatenated) and Stable
Diffusion 2's x4 upscaler (`--noise_level`, text `--prompt`). Images larger than the model's size are
processed in overlapping tiles (`--tile`, `--overlap`, in input pixels) blended without seams.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ldm.cli import (UsageError, add_folder_task_arguments, add_model_arguments, check_options, load_from_arguments,
                     report_outputs, sampler_name)
from ldm.data.folder import IMAGE_EXTENSIONS
from ldm.errors import entry_point
from ldm.files import ImageReadError, check_outputs, file_hash, load_image, save_png, to_uint8
from ldm.generation import first_stage_factor
from ldm.superres import check_superres_model, upscale

COMPVIS_CONFIG = "models/ldm/bsr_sr/config.yaml"
COMPVIS_CKPT = "models/ldm/bsr_sr/model.ckpt"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_folder_task_arguments(p, indir_help="low-resolution images", steps=100)
    p.add_argument("--noise_level", type=int, default=None,
                   help="augmentation noise level of a noise-augmented upscaler (SD2 x4: 0-350, 20 is typical)")
    p.add_argument("--tile", type=int, default=None, help="tile side in input pixels (default: the model's size)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in input pixels (default: tile / 4)")
    p.add_argument("--tile_batch", type=int, default=8, help="tiles sampled at once (bounds memory)")
    add_model_arguments(p, COMPVIS_CKPT, COMPVIS_CONFIG)
    return p


@entry_point
def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    check_options(opt)
    indir, out = Path(opt.indir), Path(opt.outdir)
    sampler = sampler_name(opt)
    if not indir.is_dir():
        raise UsageError(f"--indir {indir} is not a directory")
    files = sorted(p for p in indir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"--indir {indir}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    check_outputs([out / (p.stem + ".png") for p in files], files, overwrite=opt.overwrite, flag="--outdir")
    model, _ = load_from_arguments(opt, COMPVIS_CKPT, COMPVIS_CONFIG)
    check_superres_model(model)
    out.mkdir(parents=True, exist_ok=True)
    h = file_hash(opt.ckpt)
    f = first_stage_factor(model)
    written, skipped = [], []
    for k, path in enumerate(tqdm(files, desc="super-resolution")):
        try:
            lr = load_image(path)
        except ImageReadError as e:
            skipped.append((path.name, str(e)))
            continue
        hr = upscale(model, lr, [opt.prompt or ""], steps=opt.steps, sampler=sampler, seed=opt.seed + k,
                     scale=opt.scale, noise_level=opt.noise_level, tile=opt.tile, overlap=opt.overlap,
                     tile_batch=opt.tile_batch, use_ema=not opt.no_ema, precision=opt.precision, spacing=opt.spacing,
                     rescale=opt.guidance_rescale)
        save_png(to_uint8(hr)[0], out / (path.stem + ".png"),
                 {"input": str(path), "factor": f, "steps": opt.steps, "sampler": sampler, "seed": opt.seed + k,
                  "noise_level": opt.noise_level, "prompt": opt.prompt or "", "ckpt_sha256": h})
        written.append(path.name)
    print(f"({f}x)")
    return report_outputs(written, skipped, out)


if __name__ == "__main__":
    sys.exit(main())
