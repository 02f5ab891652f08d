"""Benchmark: 4x super-resolution of held-out natural crops (coffee.png, never in training) against bicubic.

    python benchmarks/superres_skimage.py --ckpt logs/<sr run>/checkpoints/last.ckpt [--n 100] \
        [--runs ddim:50 dpmpp_2m:20]

Inputs: `ldm.data.superres.SkimageSR(split="validation")` crops, 32x32, bicubic-downscaled to 8x8 (the
model's training degradation). Reported, for the model and for bicubic upsampling of the input:
- PSNR of the luminance (ITU-R BT.601 Y, 8-bit range) and SSIM (on Y) against the ground truth;
- consistency: PSNR (RGB) of the output downscaled back (bicubic) against the input;
- sharpness: high-frequency energy (mean squared Laplacian) relative to the ground truth's (1 = as sharp);
- the autoencoder's own reconstruction PSNR (the ceiling of any LDM on it), and the time per image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage.metrics import structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.data.superres import SkimageSR  # noqa: E402
from ldm.files import to_uint8# noqa: E402
from ldm.runs import load_for_sampling# noqa: E402
from ldm.superres import upscale  # noqa: E402


def luminance(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 Y in [16, 235] of a uint8 RGB image (the SR literature's PSNR-Y convention)."""
    x = img.astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def hf_energy(img: np.ndarray) -> float:
    """Mean squared Laplacian of the luminance."""
    return float(np.mean(ndimage.laplace(luminance(img)) ** 2))


def bicubic(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def metrics(out: np.ndarray, gt: np.ndarray, lr: np.ndarray) -> dict[str, float]:
    y_out, y_gt = luminance(out), luminance(gt)
    return {"psnr_y": psnr(y_out, y_gt), "ssim_y": structural_similarity(y_out, y_gt, data_range=255.0),
            "consistency": psnr(bicubic(out, lr.shape[0]), lr), "hf_ratio": hf_energy(out) / max(hf_energy(gt), 1e-8)}


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="*", default=["ddim:50"], help="sampler:steps")
    p.add_argument("--grid", default=None, help="PNG: rows low-res input (nearest), bicubic, model (first run), ground "
                                                "truth, for the first 8 crops")
    args = p.parse_args()
    model, cfg = load_for_sampling(args.ckpt)
    dparams = cfg.data.params.validation.params
    ds = SkimageSR(split="validation", size=32, num_samples=args.n, degradation=dparams.degradation,
                   downscale_f=dparams.downscale_f, min_crop_f=dparams.min_crop_f, max_crop_f=dparams.max_crop_f)
    items = [ds[i] for i in range(args.n)]
    gt = to_uint8(torch.from_numpy(np.stack([it["image"] for it in items])).permute(0, 3, 1, 2))
    lr_t = torch.from_numpy(np.stack([it["LR_image"] for it in items])).permute(0, 3, 1, 2)
    lr = to_uint8(lr_t)
    with torch.no_grad():
        rec = model.decode_first_stage(model.scale_factor * model.first_stage_model.encode(
            torch.from_numpy(np.stack([it["image"] for it in items])).permute(0, 3, 1, 2)).mode())
    ae = np.mean([psnr(luminance(a), luminance(b)) for a, b in zip(to_uint8(rec), gt)])
    print(f"{args.n} held-out crops (coffee.png), 32x32 from 8x8 ({dparams.degradation}); autoencoder "
          f"reconstruction PSNR-Y {ae:.2f} dB")
    print("| method | PSNR-Y dB | SSIM-Y | consistency dB | HF energy / GT | s per image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = summarize([metrics(bicubic(l, 32), g, l) for l, g in zip(lr, gt)])
    print(f"| bicubic | {base['psnr_y']:.2f} | {base['ssim_y']:.3f} | {base['consistency']:.2f} | "
          f"{base['hf_ratio']:.3f} | - |", flush=True)
    first = None
    for spec in args.runs:
        name, steps = spec.split(":")
        t0 = time.time()
        outs = []
        for i in range(0, args.n, args.batch):
            outs.append(upscale(model, lr_t[i:i + args.batch], steps=int(steps), sampler=name, seed=args.seed + i,
                                tile_batch=args.batch))
        wall = time.time() - t0
        first = torch.cat(outs) if first is None else first
        res = summarize([metrics(o, g, l) for o, g, l in zip(to_uint8(torch.cat(outs)), gt, lr)])
        print(f"| LDM-SR {name} {steps} steps | {res['psnr_y']:.2f} | {res['ssim_y']:.3f} | {res['consistency']:.2f} | "
              f"{res['hf_ratio']:.3f} | {wall / args.n:.3f} |", flush=True)
    if args.grid and first is not None:
        import torchvision
        up = torch.nn.functional.interpolate
        bic = torch.from_numpy(np.stack([bicubic(x, 32) for x in lr[:8]])).permute(0, 3, 1, 2).float() / 127.5 - 1
        gt_t = torch.from_numpy(np.stack([it["image"] for it in items[:8]])).permute(0, 3, 1, 2)
        rows = [up(lr_t[:8], scale_factor=4, mode="nearest"), bic, first[:8].cpu(), gt_t]
        grid = torchvision.utils.make_grid(torch.cat(rows), nrow=8, normalize=True, value_range=(-1, 1))
        torchvision.utils.save_image(up(grid[None], scale_factor=4)[0], args.grid)
        print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
