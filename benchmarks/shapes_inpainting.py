"""Benchmark: text-conditioned inpainting on held-out shapes images, read back by the shapes evaluator.

    python benchmarks/shapes_inpainting.py --ckpt logs/<inpainting run>/checkpoints/last.ckpt [--n 200] \
        [--runs ddim:50 dpmpp_2m:20] [--replace-ckpt logs/<txt2img run>/checkpoints/last.ckpt]

Images: the test split of the shapes dataset (seed 0, never seen in training). Mask: the box over the
object's position (`ldm.data.inpainting.shapes_object_box`), so the erased object can only come back
from the caption. Two captions per image: the image's own ("same"), and one that differs from the
erased object in one attribute ("changed": shape, color and size in turn; the position is the mask's).
Scored: per-attribute accuracy against the caption, the all-four rate, and the largest change of a
known pixel (0 by construction of the final paste). `--replace-ckpt` also runs a text-to-image model
with known-region replacement (no inpainting training), with and without RePaint resampling.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.data.inpainting import shapes_object_box  # noqa: E402
from ldm.data.shapes import COLOR_NAMES, SHAPES, SIZE_NAMES, ShapesDataset, canonical_caption  # noqa: E402
from ldm.eval.shapes_eval import score  # noqa: E402
from ldm.runs import load_for_sampling# noqa: E402
from ldm.inpainting import inpaint  # noqa: E402

CHANGED = ("shape", "color", "size")


def changed_caption(spec, i: int) -> str:
    """The caption with one attribute (shape, color, size in turn by index) replaced by the next value of its list."""
    attrs = {"shape": spec.shape, "color": spec.color, "size": spec.size, "position": spec.position}
    key = CHANGED[i % len(CHANGED)]
    names = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZE_NAMES}[key]
    attrs[key] = names[(names.index(attrs[key]) + 1 + (i // len(CHANGED)) % (len(names) - 1)) % len(names)]
    return canonical_caption(attrs["shape"], attrs["color"], attrs["size"], attrs["position"])


def run(model, images, masks, captions, name, steps, batch, seed, **kw) -> tuple[dict, float, float, torch.Tensor]:
    t0 = time.time()
    out = []
    for i in range(0, len(images), batch):
        out.append(inpaint(model, images[i:i + batch], masks[i:i + batch], captions[i:i + batch], steps=steps,
                           sampler=name, seed=list(range(seed + i, seed + i + len(images[i:i + batch]))), **kw))
    out = torch.cat(out)
    wall = time.time() - t0
    keep = masks < 0.5
    known_change = float((out - images).abs().masked_select(keep.expand_as(out)).max())
    return score(list(out), list(captions)), wall, known_change, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--replace-ckpt", default=None, help="a text-to-image run to inpaint by known-region replacement")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="*", default=["ddim:50"], help="sampler:steps")
    p.add_argument("--grid", default=None, help="PNG: rows input, masked input, same-caption and changed-caption "
                                                "fills of the first 8 images (inpainting model, first run)")
    args = p.parse_args()
    ds = ShapesDataset(size=32, split="test", num_samples=args.n, seed=0)
    specs = [ds.spec(i) for i in range(args.n)]
    images = torch.from_numpy(np.stack([ds[i]["image"] for i in range(args.n)])).permute(0, 3, 1, 2)
    masks = torch.from_numpy(np.stack([shapes_object_box(s.position, 32) for s in specs]))[:, None]
    same = [s.caption for s in specs]
    changed = [changed_caption(s, i) for i, s in enumerate(specs)]
    models = [("inpainting model", args.ckpt, {})]
    if args.replace_ckpt:
        models += [("txt2img + known-region replacement", args.replace_ckpt, {"mode": "replace"}),
                   ("txt2img + replacement + RePaint (j=5, r=5)", args.replace_ckpt,
                    {"mode": "replace", "jump_length": 5, "jump_n_sample": 5})]
    print(f"{args.n} held-out shapes images (test split), box mask over the object; mask covers "
          f"{float(masks.mean()):.3f} of the pixels on average")
    print("| model | sampler | steps | caption | shape | color | size | position | all four | max known-pixel change | wall s |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    grid_rows: dict = {}
    for label, ckpt, kw in models:
        model, _ = load_for_sampling(ckpt)
        for spec in args.runs:
            name, steps = spec.split(":")
            for cap_name, caps in (("same", same), ("changed", changed)):
                res, wall, dk, out = run(model, images, masks, caps, name, int(steps), args.batch, args.seed, **kw)
                grid_rows[cap_name] = grid_rows.get(cap_name, out[:8])
                print(f"| {label} | {name} | {steps} | {cap_name} | {res['shape']:.3f} | {res['color']:.3f} | "
                      f"{res['size']:.3f} | {res['position']:.3f} | **{res['all']:.3f}** | {dk:.1e} | {wall:.1f} |",
                      flush=True)
    if args.grid:
        import torchvision
        rows = [images[:8], images[:8] * (1 - masks[:8]), grid_rows["same"], grid_rows["changed"]]
        grid = torchvision.utils.make_grid(torch.cat(rows), nrow=8, normalize=True, value_range=(-1, 1))
        torchvision.utils.save_image(torch.nn.functional.interpolate(grid[None], scale_factor=4)[0], args.grid)
        print(f"grid: {args.grid}; changed captions of its columns: {changed[:8]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
