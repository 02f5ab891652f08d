"""Benchmark: which timesteps a trained model's denoiser tells its UNet, and what D(x, sigma) it returns.

    python benchmarks/denoiser_timesteps.py --ckpt logs/<run>/checkpoints/last.ckpt --out a.pt
    python benchmarks/denoiser_timesteps.py --compare a.pt b.pt      # two code versions on the same checkpoint

For DDIM-50 (uniform), trailing-50 and Karras-20 sigmas it records the timestep each level reaches
`apply_model` with, and D(x, sigma) at those levels for fixed latents and prompts (guidance off).
Run it with two versions of the code (e.g. a git worktree of an older commit) and compare.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ldm.data.shapes import random_prompts
from ldm.runs import load_for_sampling

RUNS = (("uniform", 50), ("trailing", 50), ("karras", 20))


def record(ckpt: str, out: str) -> None:
    from ldm.sampling import get_sigmas

    model, _ = load_for_sampling(ckpt, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = random_prompts(4, seed=0)
    with torch.no_grad(), model.ema_scope():
        c = model.get_learned_conditioning(prompts)
        den = model.denoiser()
        seen: list[torch.Tensor] = []
        apply = model.apply_model
        model.apply_model = lambda x, t, cond: (seen.append(t.detach().clone()), apply(x, t, cond))[1]
        res = {}
        for spacing, steps in RUNS:
            sig = get_sigmas(den.schedule, steps, spacing)
            sig = sig[sig > 0]
            outs, ts = [], []
            for s in sig:
                x = torch.randn(4, model.channels, model.image_size, model.image_size, generator=g) * (1 + s)
                seen.clear()
                outs.append(den(x, s.expand(4), c=c))
                ts.append(float(seen[0][0]))
            res[f"{spacing}:{steps}"] = {"sigmas": sig, "t": torch.tensor(ts, dtype=torch.float64),
                                         "denoised": torch.stack(outs)}
    torch.save(res, out)
    print(f"wrote {out}")


def compare(a_path: str, b_path: str) -> None:
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    print(f"| sigmas | levels | timesteps that differ | max abs t difference | median rel. diff. of D | max rel. diff. of D |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key in a:
        ta, tb = a[key]["t"], b[key]["t"]
        da, db = a[key]["denoised"], b[key]["denoised"]
        rel = ((da - db).flatten(1).norm(dim=1) / db.flatten(1).norm(dim=1))
        print(f"| {key} | {len(ta)} | {int((ta != tb).sum())} | {float((ta - tb).abs().max()):.4f} | "
              f"{float(rel.median()):.2e} | {float(rel.max()):.2e} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt")
    p.add_argument("--out")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.ckpt and args.out:
        record(args.ckpt, args.out)
    else:
        p.error("give --ckpt and --out, or --compare A B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
