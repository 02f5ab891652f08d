"""Image-to-image with a text-to-image LDM (SDEdit): noise the encoded input to --strength, then denoise.

    python scripts/img2img.py --init-img in.png --prompt "a large red circle in the center" --strength 0.6 --ckpt ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError
from ldm.inference import Precision, file_hash, img2img, load_for_sampling, save_png, to_uint8
from ldm.sampling import SAMPLERS
from ldm.util import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-img", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--strength", type=float, default=0.75, help="0 keeps the input, 1 ignores it")
    p.add_argument("--outdir", default="outputs/img2img-samples")
    p.add_argument("--n_samples", type=int, default=2)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=None)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--config", default=None)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--unsafe-load", action="store_true")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=[x.value for x in Precision],
                   help="sampling precision (autocast: float16 on CUDA, bfloat16 on CPU; full = fp32)")
    opt = p.parse_args(argv)
    if not 0.0 < opt.strength <= 1.0:
        print(f"error: --strength must lie in (0, 1], got {opt.strength}", file=sys.stderr)
        return 2
    try:
        model, _ = load_for_sampling(opt.ckpt, opt.config, allow_pickle=opt.unsafe_load, device=opt.device)
        img = Image.open(opt.init_img).convert("RGB")
    except (ConfigError, CheckpointError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    side = model.first_stage_model.encoder.resolution
    arr = np.asarray(img.resize((side, side), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].repeat(opt.n_samples, 1, 1, 1)
    scale = model.guidance_scale if opt.scale is None else opt.scale
    images = img2img(model, x, [opt.prompt] * opt.n_samples, strength=opt.strength, steps=opt.ddim_steps,
                     sampler=opt.sampler, scale=scale, seed=opt.seed, precision=opt.precision)
    out = Path(opt.outdir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    count = len(list(out.glob("*.png")))
    h = file_hash(opt.ckpt)
    for i, a in enumerate(to_uint8(images)):
        save_png(a, out / f"{count + i:05}.png", {"prompt": opt.prompt, "init_img": opt.init_img, "strength": opt.strength,
                                                  "seed": opt.seed, "sampler": opt.sampler, "steps": opt.ddim_steps,
                                                  "scale": scale, "ckpt_sha256": h})
    print(f"wrote {len(images)} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
