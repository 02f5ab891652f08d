"""Benchmark: classifier-free guidance in one batched forward vs two separate forwards (same model, same run).

    python benchmarks/cfg_batching.py --ckpt logs/<txt2img run>/checkpoints/last.ckpt [--batch 50] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.data.shapes import random_prompts  # noqa: E402
from ldm.runs import load_for_sampling# noqa: E402
from ldm.sampling import CFGDenoiser, get_sigmas, sample_ddim  # noqa: E402


class TwoPassCFG(torch.nn.Module):
    """The same guidance computed with two separate forwards (the reference)."""

    def __init__(self, inner, scale):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x, sigma, cond=None, uncond=None):
        u = self.inner(x, sigma, **uncond)
        c = self.inner(x, sigma, **cond)
        return u + self.scale * (c - u)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    model, _ = load_for_sampling(args.ckpt)
    prompts = random_prompts(args.batch, seed=1)
    c = model.get_learned_conditioning(prompts)
    uc = model.get_learned_conditioning([""] * args.batch)
    den = model.denoiser()
    sigmas = get_sigmas(den.schedule, args.steps, "uniform")
    x = torch.randn(args.batch, model.channels, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    extra = {"cond": {"c": c}, "uncond": {"c": uc}}
    runs = {"batched": CFGDenoiser(den, scale=3.0), "two forwards": TwoPassCFG(den, 3.0)}
    times = {k: [] for k in runs}
    outs = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for k, m in runs.items():
                t0 = time.perf_counter()
                outs[k] = sample_ddim(m, x * sigmas[0], sigmas, extra_args=extra, disable=True)
                times[k].append(time.perf_counter() - t0)
    diff = (outs["batched"] - outs["two forwards"]).abs().max().item()
    mb, mt = statistics.median(times["batched"]), statistics.median(times["two forwards"])
    print(f"batch {args.batch}, {args.steps} DDIM steps, guidance 3.0; max |difference| {diff:.2e}")
    print(f"batched: {mb:.2f} s; two forwards: {mt:.2f} s; speed-up {mt / mb:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
