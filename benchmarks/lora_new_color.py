"""Benchmark: teach a trained shapes text-to-image model a colour word its training set lacks, with LoRA (issue 27).

    python benchmarks/lora_new_color.py --ckpt logs/<quickstart txt2img run>/checkpoints/last.ckpt \
        [--color purple] [--steps 400] [--n 200] [--logdir logs]

1. The fine-tuning set: 50 images of the shapes grammar, every one in `--color` (ldm.data.shapes.NEW_COLORS), with
   their captions ("a small purple circle in the top left"); the autoencoder's ceiling on them is scored first (it
   never saw the colour either).
2. The base model is scored (the project's shapes evaluator, `--n` prompts, DDIM 50 with the model's guidance) on
   the old prompts (six training colours) and on prompts with the new word; the evaluator tells seven colours apart
   (the six and the new one), and the old prompts are also scored with the six alone, as the earlier benchmarks did.
3. LoRA training through main.py (configs/finetune/lora.yaml + configs/finetune/shapes_new_color.yaml): timed.
4. The adapters are exported with scripts/convert.py --lora-out (diffusers layout, the file users share); its size
   is compared with the UNet's; the base model with the adapter merged (--lora FILE, as the sampling scripts do)
   is scored like the base.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.cli import apply_loras  # noqa: E402
from ldm.data.shapes import COLOR_NAMES, NEW_COLORS, ShapesDataset, random_prompts  # noqa: E402
from ldm.eval.shapes_eval import score  # noqa: E402
from ldm.generation import sample_prompts  # noqa: E402
from ldm.runs import RunDir, find_run_config, latest_run, load_for_sampling  # noqa: E402
from ldm.util import load_config  # noqa: E402

SAMPLER, STEPS = "ddim", 50


def adherence(model, prompts: list[str], colors, batch: int, seed: int) -> dict:
    """The evaluator's scores of the model's samples for `prompts` (DDIM 50, the model's guidance scale)."""
    images = [sample_prompts(model, prompts[i:i + batch], steps=STEPS, sampler=SAMPLER, scale=model.guidance_scale,
                             seed=seed + i) for i in range(0, len(prompts), batch)]
    return score(list(torch.cat(images)), prompts, colors=colors)


@torch.no_grad()
def ae_ceiling(model, dataset, colors: list[str]) -> dict:
    """The evaluator on the autoencoder's reconstructions (posterior mode) of the fine-tuning images."""
    x = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(len(dataset))]).permute(0, 3, 1, 2)
    ae = model.first_stage_model
    rec = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
    return score(list(rec), [dataset[i]["caption"] for i in range(len(dataset))], colors=colors)


def data_overlay(path: Path, color: str, replay: int, batch_size: int) -> Path:
    """A config overlay with the fine-tuning set in `color` and `replay` images of the six known colours (0: none)."""
    from omegaconf import OmegaConf

    parts = [{"target": "ldm.data.shapes.ShapesDataset",
              "params": {"size": 32, "split": "train", "num_samples": 50, "seed": 1, "colors": [color]}}]
    if replay:
        parts.append({"target": "ldm.data.shapes.ShapesDataset",
                      "params": {"size": 32, "split": "train", "num_samples": replay, "seed": 2}})
    cfg = {"data": {"params": {"batch_size": batch_size,
                               "train": {"params": {"dataset": {"target": "ldm.data.mix.MixedDatasets",
                                                                "params": {"datasets": parts}}}},
                               "validation": {"params": {"colors": [color]}}}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def row(name: str, res: dict) -> str:
    return (f"| {name} | {res['shape']:.3f} | {res['color']:.3f} | {res['size']:.3f} | {res['position']:.3f} | "
            f"**{res['all']:.3f}** |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the trained shapes txt2img run's checkpoint (the LoRA base)")
    p.add_argument("--color", default="purple", choices=list(NEW_COLORS))
    p.add_argument("--steps", type=int, default=600, help="LoRA optimizer steps")
    p.add_argument("--replay", type=int, default=150,
                   help="images of the six known colours mixed into the fine-tuning set (0: the 50 new images only)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="per-sample base_learning_rate (default: the config's)")
    p.add_argument("--n", type=int, default=200, help="prompts per score")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default="logs")
    p.add_argument("--skip-base", action="store_true", help="do not score the base model again")
    args = p.parse_args()
    new = args.color
    seven = list(COLOR_NAMES) + [new]
    old_prompts = random_prompts(args.n, seed=args.seed)
    new_prompts = random_prompts(args.n, seed=args.seed, colors=(new,))
    results: dict[str, dict] = {}

    base, _ = load_for_sampling(args.ckpt)
    finetune = ShapesDataset(size=32, split="train", num_samples=50, seed=1, colors=[new])
    rec = ae_ceiling(base, finetune, seven)
    print(f"autoencoder ceiling on the 50 fine-tuning images: all four {rec['all']:.3f} (color {rec['color']:.3f})")
    if not args.skip_base:
        t = time.time()
        results["base"] = {"old6": adherence(base, old_prompts, None, args.batch, args.seed),
                           "old7": adherence(base, old_prompts, seven, args.batch, args.seed),
                           "new": adherence(base, new_prompts, seven, args.batch, args.seed)}
        print(f"base scored in {time.time() - t:.0f} s", flush=True)

    ae_ckpt = load_config(find_run_config(args.ckpt)).model.params.first_stage_config.params.ckpt_path
    name = f"lora_{new}"
    cmd = [sys.executable, "main.py", "--base", "configs/ldm/shapes_txt2img.yaml", "configs/finetune/lora.yaml",
           "configs/finetune/shapes_new_color.yaml",
           str(data_overlay(Path(args.logdir) / f"{name}_data.yaml", new, args.replay, args.batch_size)),
           "-t", "-n", name, "-l", args.logdir,
           f"model.params.ckpt_path={args.ckpt}", f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}",
           f"model.params.lora_config.rank={args.rank}", f"model.params.lora_config.alpha={args.rank}",
           f"data.params.train.params.cache_dir={Path(args.logdir) / 'latent_cache'}",
           f"lightning.trainer.max_steps={args.steps}", "lightning.trainer.enable_progress_bar=false"]
    if args.lr is not None:
        cmd.append(f"model.base_learning_rate={args.lr}")
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    train_s = time.time() - t
    run_ckpt = RunDir(latest_run(args.logdir, name)).last
    adapter = Path(args.logdir) / f"{name}.safetensors"
    subprocess.run([sys.executable, "scripts/convert.py", "--ckpt", str(run_ckpt), "--lora-out", str(adapter),
                    "--overwrite"], cwd=ROOT, check=True)
    unet_params = sum(q.numel() for q in base.model.diffusion_model.parameters())
    unet_bytes = sum(q.numel() * q.element_size() for q in base.model.diffusion_model.parameters())
    print(f"LoRA training: {args.steps} steps in {train_s:.0f} s (main.py wall time, start-up and latent caching "
          f"included); adapter file {adapter.stat().st_size / 1024:.1f} KiB vs the UNet's fp32 weights "
          f"{unet_bytes / 1024:.1f} KiB ({unet_params} parameters): {adapter.stat().st_size / unet_bytes:.1%}")

    tuned, _ = load_for_sampling(args.ckpt)
    apply_loras(tuned, [str(adapter)])
    results["LoRA"] = {"old6": adherence(tuned, old_prompts, None, args.batch, args.seed),
                       "old7": adherence(tuned, old_prompts, seven, args.batch, args.seed),
                       "new": adherence(tuned, new_prompts, seven, args.batch, args.seed)}
    labels = {"old6": "old prompts, six colours read", "old7": f"old prompts, seven colours read (+{new})",
              "new": f"'{new}' prompts, seven colours read"}
    print(f"\n{args.n} prompts per row, {SAMPLER.upper()} {STEPS}, guidance {base.guidance_scale}")
    print("| model / prompts | shape | color | size | position | all four |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for model_name, res in results.items():
        for key, label in labels.items():
            print(row(f"{model_name}: {label}", res[key]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
