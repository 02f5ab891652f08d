"""Inpainting, CompVis interface: every `NAME_mask.png` in --indir (white = fill) with its `NAME.png` is filled in
and written to --outdir/NAME.png; the unmasked pixels are kept exactly.

    python scripts/inpaint.py --indir data/inpainting_examples --outdir outputs/inpainting_results --steps 50
    python scripts/inpaint.py --indir in/ --outdir out/ --ckpt logs/<run>/checkpoints/last.ckpt \
        --prompt "a large red circle in the center" --sampler dpmpp_2m --steps 20

Models: a dedicated inpainting model (SD2 LatentInpaintDiffusion, or the paper's inpainting_big), or any
other LDM through known-region replacement (`--mode replace`, optional RePaint `--jump_n_sample`).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

from tqdm import tqdm

from ldm.cli import (UsageError, add_folder_task_arguments, add_model_arguments, check_options, load_from_arguments,
                     report_outputs, sampler_name)
from ldm.errors import entry_point
from ldm.files import ImageReadError, check_outputs, file_hash, load_image, save_png, to_uint8
from ldm.generation import reads
from ldm.inpainting import inpaint_any_size, inpaint_mode
from ldm.modules.model_inputs import ConditionInput, InpaintMode

COMPVIS_CONFIG = "models/ldm/inpainting_big/config.yaml"
COMPVIS_CKPT = "models/ldm/inpainting_big/last.ckpt"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_folder_task_arguments(p, indir_help="NAME.png + NAME_mask.png pairs", steps=50)
    p.add_argument("--mode", type=str, default=None, choices=[m.value for m in InpaintMode],
                   help="default: the model's own (replace for models without inpainting inputs)")
    p.add_argument("--jump_length", type=int, default=1, help="RePaint block length (with --mode replace)")
    p.add_argument("--jump_n_sample", type=int, default=1, help="RePaint resamplings per block (1 = none)")
    add_model_arguments(p, COMPVIS_CKPT, COMPVIS_CONFIG)
    return p


def pairs(indir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs: NAME_mask.png with NAME.png, sorted; a mask without its image is an error."""
    masks = sorted(Path(p) for p in glob.glob(os.path.join(glob.escape(str(indir)), "*_mask.png")))
    out = []
    for m in masks:
        img = m.with_name(m.name[:-len("_mask.png")] + ".png")
        if not img.is_file():
            raise FileNotFoundError(f"mask {m} has no image {img}")
        out.append((img, m))
    return out


@entry_point
def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    check_options(opt)
    indir, out = Path(opt.indir), Path(opt.outdir)
    sampler = sampler_name(opt)
    if not indir.is_dir():
        raise UsageError(f"--indir {indir} is not a directory")
    jobs = pairs(indir)
    if not jobs:
        raise UsageError(f"--indir {indir}: no NAME_mask.png files in it")
    check_outputs([out / img.name for img, _ in jobs], [p for job in jobs for p in job], overwrite=opt.overwrite,
                  flag="--outdir")
    model, _ = load_from_arguments(opt, COMPVIS_CKPT, COMPVIS_CONFIG)
    mode = InpaintMode(opt.mode) if opt.mode else inpaint_mode(model)
    text = reads(model, ConditionInput.PROMPTS)
    if text and opt.prompt is None:
        raise UsageError("this model is text-conditioned: give --prompt")
    out.mkdir(parents=True, exist_ok=True)
    h = file_hash(opt.ckpt)
    written, skipped = [], []
    for k, (img_path, mask_path) in enumerate(tqdm(jobs, desc="inpainting")):
        try:
            image = load_image(img_path)
            mask = load_image(mask_path).mean(dim=1, keepdim=True) > 0.0  # white (> mid-gray) = fill
        except ImageReadError as e:
            skipped.append((img_path.name, str(e)))
            continue
        if mask.shape[-2:] != image.shape[-2:]:
            skipped.append((img_path.name, f"mask {mask_path.name} is {mask.shape[-1]}x{mask.shape[-2]}, the image "
                                           f"{image.shape[-1]}x{image.shape[-2]}"))
            continue
        result = inpaint_any_size(model, image, mask.float(), [opt.prompt] if text else None, steps=opt.steps,
                                  sampler=sampler, scale=opt.scale, seed=opt.seed + k, mode=mode,
                                  jump_length=opt.jump_length, jump_n_sample=opt.jump_n_sample,
                                  use_ema=not opt.no_ema, precision=opt.precision, spacing=opt.spacing,
                                  rescale=opt.guidance_rescale)
        save_png(to_uint8(result)[0], out / img_path.name,
                 {"image": str(img_path), "mask": str(mask_path), "prompt": opt.prompt or "", "mode": mode.value,
                  "seed": opt.seed + k, "sampler": sampler, "steps": opt.steps, "ckpt_sha256": h})
        written.append(img_path.name)
    return report_outputs(written, skipped, out)


if __name__ == "__main__":
    sys.exit(main())
