"""Benchmark: prompt adherence of a shapes text-to-image LDM, scored by the project's shapes evaluator.

    python benchmarks/shapes_adherence.py --ckpt logs/<run>/checkpoints/last.ckpt [--n 200] \
        [--runs ddim:50 ddim:20 plms:20 dpmpp_2m:20 unipc:10]

Prompts: `ldm.data.shapes.random_prompts(n, seed=0)` (uniform over the grammar). Guidance scale: the
model's `guidance_scale`, as scripts/txt2img.py uses by default. Prints, per sampler and step count,
the per-attribute accuracy, the all-four rate and the sampling wall time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.data.shapes import random_prompts  # noqa: E402
from ldm.eval.shapes_eval import score  # noqa: E402
from ldm.generation import sample_prompts# noqa: E402
from ldm.runs import load_for_sampling# noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="*", default=["ddim:50"], help="sampler:steps")
    args = p.parse_args()
    model, _ = load_for_sampling(args.ckpt)
    scale = model.guidance_scale if args.scale is None else args.scale
    prompts = random_prompts(args.n, seed=args.seed)
    print(f"checkpoint {args.ckpt}; {args.n} prompts; guidance scale {scale}")
    print("| sampler | steps | shape | color | size | position | all four | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for spec in args.runs:
        name, steps = spec.split(":")
        t0 = time.time()
        images = []
        for i in range(0, args.n, args.batch):
            images.append(sample_prompts(model, prompts[i:i + args.batch], steps=int(steps), sampler=name, scale=scale,
                                         seed=args.seed + i))
        wall = time.time() - t0
        res = score(list(torch.cat(images)), prompts)
        print(f"| {name} | {steps} | {res['shape']:.3f} | {res['color']:.3f} | {res['size']:.3f} | "
              f"{res['position']:.3f} | **{res['all']:.3f}** | {wall:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
