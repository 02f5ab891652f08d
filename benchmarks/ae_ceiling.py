"""Benchmark: the adherence ceiling an autoencoder leaves an LDM: the shapes evaluator on its reconstructions.

    python benchmarks/ae_ceiling.py --ckpt logs/<ae run>/checkpoints/last.ckpt [--n 500]

Encodes `--n` validation images, decodes the posterior mode and a posterior sample, and scores both
against the images' captions. An LDM on these latents cannot score above the reconstructions. Also
lists the most frequent shape confusions (true shape, size, read shape).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.data.shapes import ShapesValidation  # noqa: E402
from ldm.eval.shapes_eval import read_image, score  # noqa: E402
from ldm.util import instantiate_from_config, load_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--config", default=str(ROOT / "configs/autoencoder/shapes_kl_f4.yaml"))
    p.add_argument("--n", type=int, default=500)
    args = p.parse_args()
    cfg = load_config(args.config).model
    cfg.params.ckpt_path = args.ckpt
    cfg.params.lossconfig = {"target": "torch.nn.Identity"}
    ae = instantiate_from_config(cfg).eval()
    ds = ShapesValidation(size=32, num_samples=args.n)
    items = [ds[i] for i in range(args.n)]
    x = torch.stack([torch.as_tensor(it["image"]) for it in items]).permute(0, 3, 1, 2)
    captions = [it["caption"] for it in items]
    with torch.no_grad():
        post = ae.encode(x)
        recs = {"mode": ae.decode(post.mode()), "sample": ae.decode(post.sample())}
    print(f"{args.ckpt}: {args.n} validation images")
    for name, rec in recs.items():
        r = score(list(rec), captions)
        psnr = (10 * torch.log10(4.0 / (rec.clamp(-1, 1) - x).pow(2).mean())).item()
        print(f"{name}: PSNR {psnr:.2f} dB | shape {r['shape']:.3f} | color {r['color']:.3f} | size {r['size']:.3f} | "
              f"position {r['position']:.3f} | all four {r['all']:.3f}")
    confusions = Counter((it["shape"], it["size"], read_image(img).shape) for img, it in zip(recs["mode"], items)
                         if read_image(img).shape != it["shape"])
    print("shape confusions (true, size, read):", confusions.most_common(6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
