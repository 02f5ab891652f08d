"""Benchmark: how fast a shapes text-to-image recipe learns, as prompt adherence against training steps.

    python benchmarks/ldm_recipe.py --ae logs/<ae run>/checkpoints/last.ckpt --steps 1200 --evals 600,1200 \
        [--bs 64] [--lr 2e-3] [--warmup 100] [--threads 1] [--over key=value ...]

A plain training loop (no Lightning) over the shapes config's model (`configs/ldm/shapes_txt2img.yaml`
with `--over` overrides): the training set is encoded once into posterior moments (cached next to the
autoencoder checkpoint's hash under benchmarks/out/), captions are embedded once, and each step draws
a batch, samples the posterior, drops captions with the config's `ucg_rate`, and takes one fused-AdamW
step with an EMA update. At each step listed in `--evals` the EMA model samples `--neval` prompts of
`random_prompts(seed=0)` with DDIM `--evsteps` at the config's guidance scale (and any `--scales` at the
last one), scored by the shapes evaluator. Steps are the unit, so concurrent runs compare fairly.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.data.latents import encode_dataset  # noqa: E402
from ldm.data.shapes import ShapesTrain, random_prompts  # noqa: E402
from ldm.eval.shapes_eval import score  # noqa: E402
from ldm.generation import sample_prompts# noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae", required=True, help="shapes autoencoder checkpoint")
    p.add_argument("--config", default=str(ROOT / "configs/ldm/shapes_txt2img.yaml"))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--evals", default="600,1200")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--neval", type=int, default=100)
    p.add_argument("--evsteps", type=int, default=20)
    p.add_argument("--scales", default="", help="extra guidance scales scored at the last evaluation")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--over", nargs="*", default=[], help="config overrides, key=value")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = OmegaConf.load(args.config)
    cfg.model.params.first_stage_config.params.ckpt_path = args.ae
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.over))
    model = instantiate_from_config(cfg.model)

    tag = hashlib.sha256(Path(args.ae).read_bytes()).hexdigest()[:12]
    cache = ROOT / "benchmarks" / "out" / f"recipe_latents_{tag}_{args.num_samples}.pt"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        moments, rest = encode_dataset(ShapesTrain(size=32, num_samples=args.num_samples), model.first_stage_model)
        torch.save({"moments": moments, "captions": [r["caption"] for r in rest]}, cache)
    data = torch.load(cache, weights_only=True)
    captions = data["captions"]
    table = sorted(set(captions) | {""})
    index = torch.tensor([table.index(c) for c in captions])
    null = table.index("")
    with torch.no_grad():
        emb = model.get_learned_conditioning(table)
    mean, logvar = data["moments"].chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    if model.scale_by_std:
        model.scale_factor.copy_(1.0 / (mean + std * torch.randn_like(std)).flatten().std())
    sf = float(model.scale_factor)

    params = list(model.model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, fused=True)
    evals = [int(e) for e in args.evals.split(",")]
    prompts = random_prompts(args.neval, seed=0)
    print(f"UNet {sum(q.numel() for q in params) / 1e6:.2f} M params, scale_factor {sf:.4f}, batch {args.bs}, "
          f"lr {args.lr}, overrides {args.over}", flush=True)
    g = torch.Generator().manual_seed(0)
    train_s = 0.0
    model.train()
    for step in range(1, args.steps + 1):
        t0 = time.time()
        b = torch.randint(0, len(index), (args.bs,), generator=g)
        z = sf * (mean[b] + std[b] * torch.randn_like(mean[b]))
        ci = torch.where(torch.rand(args.bs) < model.ucg_rate, torch.full_like(index[b], null), index[b])
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / max(args.warmup, 1))
        loss, _ = model.p_losses(z, emb[ci])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if model.use_ema:
            model.model_ema(model.model)
        train_s += time.time() - t0
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} ({train_s / step:.3f} s/step)", flush=True)
        if step in evals:
            model.eval()
            scales = [model.guidance_scale]
            if args.scales and step == evals[-1]:
                scales += [float(s) for s in args.scales.split(",")]
            for scale in scales:
                images = torch.cat([sample_prompts(model, prompts[i:i + 50], steps=args.evsteps, sampler="ddim",
                                                   scale=scale, seed=i) for i in range(0, args.neval, 50)])
                r = score(list(images), prompts)
                print(f"EVAL step {step} scale {scale} | shape {r['shape']:.3f} | color {r['color']:.3f} | "
                      f"size {r['size']:.3f} | position {r['position']:.3f} | all four {r['all']:.3f}", flush=True)
            model.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
