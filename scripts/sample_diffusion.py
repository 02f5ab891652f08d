"""Sample an unconditional or class-conditional LDM: PNGs plus one .npz (uint8 NHWC) batch for metrics.

    python scripts/sample_diffusion.py --ckpt logs/<run>/checkpoints/last.ckpt -n 64 --custom_steps 50
    python scripts/sample_diffusion.py --ckpt ... --class_label 3 --scale 2.0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ldm.checkpoint import CheckpointError
from ldm.inference import Precision, file_hash, load_for_sampling, precision_scope, save_png, to_uint8
from ldm.sampling import SAMPLERS
from ldm.util import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("-n", "--n_samples", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--custom_steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--class_label", type=int, default=None, help="class-conditional models: the class (default: cycle)")
    p.add_argument("--scale", type=float, default=None, help="guidance scale for class-conditional models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-l", "--logdir", default="outputs/sample_diffusion")
    p.add_argument("--unsafe-load", action="store_true")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=[x.value for x in Precision],
                   help="sampling precision (autocast: float16 on CUDA, bfloat16 on CPU; full = fp32)")
    opt = p.parse_args(argv)
    try:
        model, _ = load_for_sampling(opt.ckpt, opt.config, allow_pickle=opt.unsafe_load, device=opt.device)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    conditional = model.model.conditioning_key is not None
    if conditional and getattr(model.cond_stage_model, "null_label", None) is None and not hasattr(model.cond_stage_model, "n_classes"):
        print("error: this model is not unconditional or class-conditional; use scripts/txt2img.py", file=sys.stderr)
        return 2
    scale = (model.guidance_scale if opt.scale is None else opt.scale) if conditional else 1.0
    out = Path(opt.logdir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    h, done, arrays = file_hash(opt.ckpt), 0, []
    kw = {"eta": opt.eta} if opt.eta else {}  # a sampler without an eta refuses a non-zero one
    with tqdm(total=opt.n_samples, desc="sampling") as bar:
        while done < opt.n_samples:
            bs = min(opt.batch_size, opt.n_samples - done)
            g = torch.Generator(device=model.device).manual_seed(opt.seed + done)
            c = uc = labels = None
            if conditional:
                n_cls = model.cond_stage_model.n_classes
                labels = (torch.full((bs,), opt.class_label) if opt.class_label is not None
                          else torch.arange(done, done + bs) % n_cls).to(model.device)
                c = model.get_learned_conditioning(labels)
                uc = model.get_unconditional_conditioning(labels) if scale != 1.0 else None
            with model.ema_scope("sampling"), precision_scope(opt.precision, model.device):
                z = model.sample(c, bs, steps=opt.custom_steps, sampler=opt.sampler, guidance_scale=scale, uncond=uc,
                                 generator=g, **kw)
                imgs = to_uint8(model.decode_first_stage(z.float()).float())
            for i, a in enumerate(imgs):
                meta = {"seed": opt.seed + done, "index_in_batch": i, "sampler": opt.sampler, "steps": opt.custom_steps,
                        "scale": scale, "ckpt_sha256": h}
                if labels is not None:
                    meta["class_label"] = int(labels[i])
                save_png(a, out / "img" / f"sample_{done + i:06}.png", meta)
            arrays.append(imgs)
            done += bs
            bar.update(bs)
    np.savez(out / f"{opt.n_samples}x{'x'.join(map(str, arrays[0].shape[1:]))}-samples.npz", np.concatenate(arrays))
    print(f"wrote {done} samples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
