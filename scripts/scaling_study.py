"""The thesis experiment ("scaling properties of latent diffusion models") in miniature, on MNIST-5k:
train several UNet widths for the same training compute, sweep samplers x steps x guidance scales, pick the
best scale per (size, sampler, steps) by domain FID, and plot quality against normalized sampling cost.

    python scripts/scaling_study.py --ae logs/<mnist ae run>/checkpoints/last.ckpt --outdir outputs/scaling_study

Training compute per size is 3 x (UNet forward FLOPs) x batch x steps (forward + backward); the reference
width gets --budget_steps and every other width the steps that spend the same FLOPs. Sampling cost is
normalized to the smallest width: (forwards per sample) x (FLOPs per forward / smallest width's FLOPs), with
guidance counted as the second forward it is. Quality is the domain FID (features of a classifier trained on
MNIST-5k, ldm.eval.domain) of N class-balanced samples against the validation split, plus the classifier's
class accuracy. Everything lands in --outdir (state.json, one evaluation folder per width, study.csv,
best.csv, scaling_study.png); rerunning the command resumes: finished trainings and grid cells are kept.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ldm.cli import check_options
from ldm.errors import entry_point

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "scaling" / "mnist_miniature.yaml"
AE_CONFIG = ROOT / "configs" / "autoencoder" / "mnist_kl_f4.yaml"
# forward + backward of a training step cost about 3 forwards (backward: gradients of inputs and of weights)
TRAIN_FORWARDS_PER_STEP = 3


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def load_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"trained": {}}


def save_state(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def unet_flops(width: int, base) -> int:
    from ldm.eval.cost import unet_cost
    cfg = OmegaConf.merge(base.model.params.unet_config, {"params": {"model_channels": width}})
    shape = (base.model.params.channels, base.model.params.image_size, base.model.params.image_size)
    return unet_cost(cfg, shape, context_tokens=1).flops  # one class token through cross-attention


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (width, sampler, steps), the row of the guidance scale with the lowest domain FID."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = (r["width"], r["sampler"], r["steps"])
        if k not in best or r["domain_fid"] < best[k]["domain_fid"]:
            best[k] = r
    return [best[k] for k in sorted(best)]


def write_csv(rows: list[dict], path: Path, cols: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(best: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samplers = sorted({r["sampler"] for r in best})
    fig, axes = plt.subplots(1, len(samplers), figsize=(5.2 * len(samplers), 4), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], samplers):
        for w in sorted({r["width"] for r in best}):
            pts = sorted((r["normalized_cost"], r["domain_fid"], r["steps"]) for r in best
                         if r["sampler"] == s and r["width"] == w)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"c = {w}")
            for x, y, n in pts:
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("normalized sampling cost (forwards x FLOPs / smallest model's)")
        ax.set_title(f"{s}: best guidance scale per point (labels: steps)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("domain FID (lower is better)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@entry_point
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ae", default=None, help="MNIST KL-f4 autoencoder checkpoint (default: train one)")
    p.add_argument("--ae_steps", type=int, default=600)
    p.add_argument("--widths", nargs="+", type=int, default=[32, 64, 128], help="UNet base widths (multiples of 32)")
    p.add_argument("--budget_width", type=int, default=64, help="the width that trains for --budget_steps")
    p.add_argument("--budget_steps", type=int, default=1200)
    p.add_argument("--equal", choices=["compute", "steps"], default="compute",
                   help="what every width gets the same of: training FLOPs (default), or training steps "
                        "(--budget_steps each, as the thesis trained its family)")
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m"])
    p.add_argument("--steps", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    p.add_argument("--n", type=int, default=200, help="samples per cell (class-balanced)")
    p.add_argument("--batch_size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain_classifier", default=None, help="default: train one into --outdir")
    p.add_argument("--classifier_steps", type=int, default=1500)
    p.add_argument("--outdir", default="outputs/scaling_study")
    p.add_argument("--logdir", default="logs")
    p.add_argument("--device", default=None, help="where sampling and scoring run (default: cuda when available)")
    opt = p.parse_args(argv)
    check_options(opt)  # --steps, --n, --batch_size at least 1
    if any(w % 32 for w in opt.widths + [opt.budget_width]):
        print("error: widths must be multiples of 32 (GroupNorm with 32 groups)", file=sys.stderr)
        return 2
    out = Path(opt.outdir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = load_state(state_path)
    py = sys.executable
    from ldm.runs import RunDir, latest_run

    # 1. the autoencoder (given, or trained once and remembered)
    ae = opt.ae or state.get("ae")
    if ae is None:
        t0 = time.time()
        run([py, "main.py", "--base", str(AE_CONFIG), "-t", "-n", "scaling_ae", "-l", opt.logdir,
             f"lightning.trainer.max_steps={opt.ae_steps}", "lightning.trainer.enable_progress_bar=false"])
        ae = str(RunDir(latest_run(opt.logdir, "scaling_ae")).last)
        state["ae"], state["ae_seconds"] = ae, round(time.time() - t0, 1)
        save_state(state, state_path)
    if not Path(ae).is_file():
        print(f"error: autoencoder checkpoint not found: {ae}", file=sys.stderr)
        return 2

    # 2. the domain classifier
    clf = opt.domain_classifier or str(out / "domain_mnist.safetensors")
    if not Path(clf).is_file():
        t0 = time.time()
        run([py, "scripts/train_domain_classifier.py", "--base", str(CONFIG), "--labels", "class_label",
             "--out", clf, "--steps", str(opt.classifier_steps)])
        state["classifier_seconds"] = round(time.time() - t0, 1)
        save_state(state, state_path)

    # 3. equal training compute
    base = OmegaConf.load(CONFIG)
    batch = int(base.data.params.batch_size)
    flops = {w: unet_flops(w, base) for w in sorted(set(opt.widths + [opt.budget_width]))}
    budget = TRAIN_FORWARDS_PER_STEP * flops[opt.budget_width] * batch * opt.budget_steps
    if opt.equal == "compute":
        train_steps = {w: max(1, round(budget / (TRAIN_FORWARDS_PER_STEP * flops[w] * batch))) for w in opt.widths}
    else:
        train_steps = {w: opt.budget_steps for w in opt.widths}
    train_flops = {w: TRAIN_FORWARDS_PER_STEP * flops[w] * batch * train_steps[w] for w in opt.widths}
    print("training FLOPs per width: %s; steps: %s" % ({w: f"{f:.3g}" for w, f in train_flops.items()}, train_steps),
          flush=True)
    for w in opt.widths:
        key = str(w)
        done = state["trained"].get(key)
        if done and done["steps"] == train_steps[w] and Path(done["ckpt"]).is_file():
            continue
        t0 = time.time()
        name = f"scaling_c{w}"
        run([py, "main.py", "--base", str(CONFIG), "-t", "-n", name, "-l", opt.logdir,
             f"model.params.first_stage_config.params.ckpt_path={ae}",
             f"model.params.unet_config.params.model_channels={w}",
             f"lightning.trainer.max_steps={train_steps[w]}",
             f"data.params.train.params.cache_dir={Path(opt.logdir) / 'latent_cache'}"])
        state["trained"][key] = {"ckpt": str(RunDir(latest_run(opt.logdir, name)).last),
                                 "steps": train_steps[w], "seconds": round(time.time() - t0, 1),
                                 "unet_gflops_per_forward": flops[w] / 1e9, "train_flops": train_flops[w]}
        save_state(state, state_path)

    # 4. the sampling sweep, one resumable evaluation grid per width
    import torch
    from ldm.eval.cost import count_parameters
    from ldm.eval.evaluator import Evaluator
    from ldm.eval.generate import conditions_for
    from ldm.eval.grid import grid, run_grid
    from ldm.files import file_hash
    from ldm.runs import default_device, load_for_sampling
    device = opt.device or default_device()
    ref = OmegaConf.to_container(base.data.params.validation, resolve=True)
    evaluator = Evaluator(["domain_fid", "adherence"], reference=ref, domain_classifier=clf,
                          cache_dir=out / "reference_cache", device=device)
    smallest = flops[min(opt.widths)]
    rows = []
    for w in opt.widths:
        info = state["trained"][str(w)]
        model, _ = load_for_sampling(info["ckpt"], device=device)
        torch.manual_seed(0)
        settings = {"checkpoint_sha256": file_hash(info["ckpt"]), "width": w, "n": opt.n, "seed": opt.seed,
                    "train_steps": info["steps"], "evaluation": evaluator.settings()}
        extra = {"width": w, "unet_params": count_parameters(model.model), "train_steps": info["steps"],
                 "train_seconds": info["seconds"]}
        conditions = conditions_for(model, opt.n)
        rows += run_grid(model, grid(opt.samplers, opt.steps, opt.scales), evaluator, conditions, n=opt.n,
                         seed=opt.seed, batch_size=opt.batch_size, outdir=out / f"c{w}", settings=settings,
                         save_samples=False, flops_per_forward=flops[w], reference_flops=smallest, extra=extra)
    cols = ["width", "unet_params", "train_steps", "train_seconds", "sampler", "steps", "scale",
            "forwards_per_sample", "normalized_cost", "domain_fid", "class_accuracy", "sampling_seconds"]
    write_csv(rows, out / "study.csv", cols)
    best = best_rows(rows)
    write_csv(best, out / "best.csv", cols)
    plot(best, out / "scaling_study.png")
    total_sampling = sum(r["sampling_seconds"] + r["metric_seconds"] for r in rows)
    summary = {"train_seconds": {k: v["seconds"] for k, v in state["trained"].items()},
               "ae_seconds": state.get("ae_seconds"), "classifier_seconds": state.get("classifier_seconds"),
               "sweep_seconds": round(total_sampling, 1), "train_steps": train_steps}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print("width sampler   steps scale  cost    domain_fid class_acc")
    for r in best:
        print(f"{r['width']:5d} {r['sampler']:9s} {r['steps']:5d} {r['scale']:5g} {r['normalized_cost']:7.1f} "
              f"{r['domain_fid']:10.3f} {r['class_accuracy']:9.3f}")
    print(f"plot: {out / 'scaling_study.png'}; tables: {out / 'study.csv'}, {out / 'best.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
