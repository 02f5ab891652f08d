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

from ldm.checkpoint import CheckpointError
from ldm.cli import UsageError, add_sampler_choice, sampler_name
from ldm.data.folder import IMAGE_EXTENSIONS
from ldm.inference import add_model_arguments, file_hash, load_from_arguments, load_image, save_png, to_uint8
from ldm.superres import upscale, upscale_factor
from ldm.util import ConfigError

COMPVIS_CONFIG = "models/ldm/bsr_sr/config.yaml"
COMPVIS_CKPT = "models/ldm/bsr_sr/model.ckpt"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--indir", type=str, required=True)
    p.add_argument("--outdir", type=str, required=True)
    add_sampler_choice(p, steps=100)  # --steps / --ddim_steps, --plms, --dpm_solver / --dpm, --sampler
    p.add_argument("--noise_level", type=int, default=None,
                   help="augmentation noise level of a noise-augmented upscaler (SD2 x4: 0-350, 20 is typical)")
    p.add_argument("--prompt", type=str, default="", help="text for text-conditioned upscalers")
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tile", type=int, default=None, help="tile side in input pixels (default: the model's size)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in input pixels (default: tile / 4)")
    p.add_argument("--tile_batch", type=int, default=8, help="tiles sampled at once (bounds memory)")
    add_model_arguments(p, COMPVIS_CKPT, COMPVIS_CONFIG)
    return p


def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    indir = Path(opt.indir)
    try:
        sampler = sampler_name(opt)
        if not indir.is_dir():
            raise FileNotFoundError(f"--indir {indir} is not a directory")
        files = sorted(p for p in indir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {indir}")
        model, _ = load_from_arguments(opt, COMPVIS_CKPT, COMPVIS_CONFIG)
    except (UsageError, ConfigError, CheckpointError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(opt.outdir)
    out.mkdir(parents=True, exist_ok=True)
    h = file_hash(opt.ckpt)
    f = upscale_factor(model)
    written = 0
    for k, path in enumerate(tqdm(files, desc="super-resolution")):
        try:
            lr = load_image(path)
        except OSError as e:
            print(f"skipping {path.name}: {e}", file=sys.stderr)
            continue
        try:
            hr = upscale(model, lr, [opt.prompt], steps=opt.steps, sampler=sampler, seed=opt.seed + k,
                         scale=opt.scale, noise_level=opt.noise_level, tile=opt.tile, overlap=opt.overlap,
                         tile_batch=opt.tile_batch, use_ema=not opt.no_ema, precision=opt.precision)
        except ValueError as e:
            print(f"error: {path.name}: {e}", file=sys.stderr)
            return 2
        save_png(to_uint8(hr)[0], out / (path.stem + ".png"),
                 {"input": str(path), "factor": f, "steps": opt.steps, "sampler": sampler, "seed": opt.seed + k,
                  "noise_level": opt.noise_level, "prompt": opt.prompt, "ckpt_sha256": h})
        written += 1
    print(f"wrote {written} images ({f}x) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
