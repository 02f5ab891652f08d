"""Benchmark: prompt adherence of the moving-shapes video LDM, and the image LDM it started from on the same prompts.

    python benchmarks/video_shapes_adherence.py --ckpt logs/<ts>_video_shapes/checkpoints/last.ckpt \
        [--image-ckpt logs/<ts>_quickstart_txt2img/checkpoints/last.ckpt] [--n 200] [--steps 50] [--seed 1]

Draws --n captions of the moving-shapes grammar (every motion equally often), samples one clip per caption with
the video model (clip k: seed + k) and scores them with ldm.eval.video_shapes: per-frame shape / colour / size,
motion from the object's track, temporal consistency. With --image-ckpt, the image model samples one image per
frame of each clip from the same captions (seeds seed + k * frames + j) and its per-frame adherence is printed
beside the video model's. Prints one JSON line per model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.data.moving_shapes import MOTION_NAMES, parse_video_caption, sample_clip_spec  # noqa: E402
from ldm.eval.shapes_eval import read_image  # noqa: E402
from ldm.eval.video_shapes import FRAME_ATTRIBUTES, score_clips  # noqa: E402
from ldm.generation import image_seeds, sample_prompts  # noqa: E402
from ldm.runs import load_for_sampling  # noqa: E402


def captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [sample_clip_spec(rng, 32, 2, {"motion": MOTION_NAMES[k % len(MOTION_NAMES)]}).caption for k in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--image-ckpt", default=None)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: each model's)")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    prompts = captions(args.n, args.seed)
    video, _ = load_for_sampling(args.ckpt)
    frames = video.num_frames
    clips = []
    for start in range(0, args.n, args.batch):
        batch = prompts[start:start + args.batch]
        out = sample_prompts(video, batch, steps=args.steps, sampler=args.sampler,
                             scale=args.scale or video.guidance_scale, seed=image_seeds(args.seed, start, len(batch)))
        clips += [c for c in out.clamp(-1, 1)]  # (C, T, H, W) each
    result = score_clips(clips, prompts)
    print(json.dumps({"model": "video", "ckpt": args.ckpt, "steps": args.steps, "sampler": args.sampler, **result}))
    if args.image_ckpt:
        image, _ = load_for_sampling(args.image_ckpt)
        hits = {a: 0 for a in FRAME_ATTRIBUTES}
        all_ok = total = 0
        flat = [(k, prompts[k]) for k in range(args.n) for _ in range(frames)]
        for start in range(0, len(flat), args.batch):
            chunk = flat[start:start + args.batch]
            out = sample_prompts(image, [c for _, c in chunk], steps=args.steps, sampler=args.sampler,
                                 scale=args.scale or image.guidance_scale,
                                 seed=image_seeds(args.seed, start, len(chunk)))
            for img, (_, caption) in zip(out.clamp(-1, 1), chunk):
                want, got = parse_video_caption(caption), read_image(img)
                ok = [getattr(got, a) == want[a] for a in FRAME_ATTRIBUTES]
                for a, o in zip(FRAME_ATTRIBUTES, ok):
                    hits[a] += int(o)
                all_ok += int(all(ok))
                total += 1
        print(json.dumps({"model": "image", "ckpt": args.image_ckpt, "steps": args.steps, "sampler": args.sampler,
                          **{f"frame_{a}": hits[a] / total for a in FRAME_ATTRIBUTES}, "frame_all": all_ok / total,
                          "n_images": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
