"""Benchmark: attention forward + backward at small head dims, torch SDPA vs the fused CPU kernel.

    python benchmarks/attention_small_heads.py [--reps 7]

Shapes of the SD-v1-shaped UNet at model_channels 64 with a batch of 4 (8 heads of 8 at 32x32):
self-attention over 32x32 = 1,024 tokens, over 16x16 = 256 tokens (16 heads of 8), and
cross-attention of 1,024 tokens to a 77-token context. The kernel only takes 8-wide heads; at 16
(tried with a D = 16 instantiation) it ran at 0.58x-0.93x of SDPA, so it was dropped. q, k, v are head splits of (B, N, H*D) projections, as inside
CrossAttention. The two alternate rep by rep; medians in ms, and the largest output difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.modules.small_head_attention import small_head_attention  # noqa: E402

SHAPES = [("self 32x32, d 8", 4, 8, 1024, 1024, 8), ("self 16x16, d 8", 4, 16, 256, 256, 8),
          ("cross 1024 -> 77, d 8", 4, 8, 1024, 77, 8)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| shape | SDPA fwd | SDPA bwd | fused fwd | fused bwd | speed-up (fwd+bwd) | max out diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, b, h, n, m, d in SHAPES:
        q, k, v = (torch.randn(b, length, h, d).transpose(1, 2).requires_grad_() for length in (n, m, m))
        grad = torch.randn(b, n, h, d).transpose(1, 2)
        fns = {"sdpa": F.scaled_dot_product_attention, "fused": small_head_attention}
        times = {key: ([], []) for key in fns}
        for rep in range(args.reps + 2):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                out = fn(q, k, v)
                t1 = time.perf_counter()
                out.backward(grad)
                t2 = time.perf_counter()
                if rep >= 2:
                    times[key][0].append(t1 - t0)
                    times[key][1].append(t2 - t1)
        with torch.no_grad():
            diff = (fns["sdpa"](q, k, v) - fns["fused"](q, k, v)).abs().max().item()
        med = {key: [statistics.median(t) * 1e3 for t in times[key]] for key in fns}
        speed = sum(med["sdpa"]) / sum(med["fused"])
        print(f"| {name} | {med['sdpa'][0]:.1f} | {med['sdpa'][1]:.1f} | {med['fused'][0]:.1f} | "
              f"{med['fused'][1]:.1f} | {speed:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
