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

With --distill, every width's model is also distilled into a 1-4 step conditional consistency student
(configs/distill/mnist_consistency.yaml on the same cached latents; the thesis' Fig. 2.13): the students are
swept with the consistency sampler, distillation.png plots distilled and undistilled quality against
normalized cost, and distillation.csv gives, per width, the distilled 4-step quality, the undistilled one at the
same cost, and the cost the undistilled model needs to match it.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from ldm.cli import check_options
from ldm.errors import entry_point

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "scaling" / "mnist_miniature.yaml"
AE_CONFIG = ROOT / "configs" / "autoencoder" / "mnist_kl_f4.yaml"
DISTILL_CONFIG = ROOT / "configs" / "distill" / "mnist_consistency.yaml"
# forward + backward of a training step cost about 3 forwards (backward: gradients of inputs and of weights)
TRAIN_FORWARDS_PER_STEP = 3
# a consistency-distillation step adds the teacher's guided pair (one batched forward of 2x the batch) and the
# target network's forward to the student's training step
DISTILL_FORWARDS_PER_STEP = TRAIN_FORWARDS_PER_STEP + 3


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def train_width(config: Path, name: str, width: int, steps: int, ae: str, logdir: str,
                extra: Sequence[str] = ()) -> tuple[str, float]:
    """One main.py run of `config` at UNet width `width` on the cached latents: (its last checkpoint, seconds)."""
    from ldm.runs import RunDir, latest_run
    t0 = time.time()
    run([sys.executable, "main.py", "--base", str(config), "-t", "-n", name, "-l", logdir, *extra,
         f"model.params.first_stage_config.params.ckpt_path={ae}",
         f"model.params.unet_config.params.model_channels={width}",
         f"lightning.trainer.max_steps={steps}",
         f"data.params.train.params.cache_dir={Path(logdir) / 'latent_cache'}"])
    return str(RunDir(latest_run(logdir, name)).last), round(time.time() - t0, 1)


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


def cost_envelope(rows: list[dict]) -> list[tuple[float, float]]:
    """(normalized cost, best domain FID among rows of exactly that cost), sorted by cost."""
    best: dict[float, float] = {}
    for r in rows:
        c = float(r["normalized_cost"])
        best[c] = min(best.get(c, float("inf")), float(r["domain_fid"]))
    return sorted(best.items())


def distillation_summary(rows: list[dict], students_steps: int) -> list[dict]:
    """Per width: the distilled student at `students_steps` steps (best scale) against the undistilled model at
    the same normalized cost or less, and the cost the undistilled model needs to reach the student's FID."""
    out = []
    for w in sorted({r["width"] for r in rows}):
        mine = [r for r in rows if r["width"] == w]
        students = [r for r in mine if r.get("distilled") and r["steps"] == students_steps]
        plain = [r for r in mine if not r.get("distilled")]
        if not students or not plain:
            continue
        s = min(students, key=lambda r: r["domain_fid"])
        cost = s["normalized_cost"]
        affordable = [r for r in plain if r["normalized_cost"] <= cost + 1e-9]
        same = min(affordable, key=lambda r: r["domain_fid"]) if affordable else None
        matching = [r for r in plain if r["domain_fid"] <= s["domain_fid"]]
        match = min(matching, key=lambda r: r["normalized_cost"]) if matching else None
        out.append({"width": w, "student_steps": students_steps, "student_scale": s["scale"],
                    "normalized_cost": cost, "student_domain_fid": s["domain_fid"],
                    "student_class_accuracy": s["class_accuracy"],
                    "undistilled_same_cost_domain_fid": same["domain_fid"] if same else None,
                    "undistilled_same_cost_setting": f"{same['sampler']} {same['steps']} steps, scale {same['scale']:g}"
                    if same else "none at this cost",
                    "undistilled_matching_cost": match["normalized_cost"] if match else None,
                    "undistilled_matching_setting": f"{match['sampler']} {match['steps']} steps, scale {match['scale']:g}"
                    if match else "not reached in the sweep",
                    "cost_factor": round(match["normalized_cost"] / cost, 2) if match else None})
    return out


def plot_distillation(rows: list[dict], path: Path) -> None:
    """The thesis' Fig. 2.13: best domain FID at each normalized cost, distilled (dashed) and not (solid)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, w in enumerate(sorted({r["width"] for r in rows})):
        color = f"C{i}"
        for distilled, style, marker, label in ((False, "-", "o", "undistilled"), (True, "--", "s", "distilled")):
            pts = cost_envelope([r for r in rows if r["width"] == w and bool(r.get("distilled")) == distilled])
            if pts:
                ax.plot([c for c, _ in pts], [f for _, f in pts], style, marker=marker, color=color,
                        label=f"c = {w}, {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("normalized sampling cost (forwards x FLOPs / smallest model's)")
    ax.set_ylabel("domain FID (lower is better), best setting at each cost")
    ax.set_title("distilled (consistency, 1-4 steps) vs undistilled")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_distill_config(distill_path: Path, base, out: Path) -> Path:
    """The distillation config on the study's data (cached latents) and trainer settings."""
    cfg = OmegaConf.load(distill_path)
    cfg.data = base.data
    cfg.lightning = base.lightning
    path = out / "distill_config.yaml"
    OmegaConf.save(cfg, path)
    return path


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
    p.add_argument("--distill", action="store_true",
                   help="also distill every width into a consistency student and sweep it (Fig. 2.13)")
    p.add_argument("--distill_steps", type=int, default=600, help="consistency-distillation steps per width")
    p.add_argument("--distill_config", default=str(DISTILL_CONFIG))
    p.add_argument("--distilled_steps", nargs="+", type=int, default=[1, 2, 4],
                   help="sampling steps of the distilled students")
    p.add_argument("--outdir", default="outputs/scaling_study")
    p.add_argument("--logdir", default="logs")
    p.add_argument("--device", default=None, help="where sampling and scoring run (default: cuda when available)")
    opt = p.parse_args(argv)
    check_options(opt)  # --steps, --n, --batch_size at least 1
    if opt.distill and (opt.distill_steps < 1 or min(opt.distilled_steps) < 1):
        print("error: --distill_steps and --distilled_steps must be at least 1", file=sys.stderr)
        return 2
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
        ckpt, seconds = train_width(CONFIG, f"scaling_c{w}", w, train_steps[w], ae, opt.logdir)
        state["trained"][key] = {"ckpt": ckpt, "steps": train_steps[w], "seconds": seconds,
                                 "unet_gflops_per_forward": flops[w] / 1e9, "train_flops": train_flops[w]}
        save_state(state, state_path)

    # 3b. a consistency-distilled student of every width, from its EMA weights
    if opt.distill:
        distill_cfg = write_distill_config(Path(opt.distill_config), base, out)
        state.setdefault("distilled", {})
        for w in opt.widths:
            key, teacher = str(w), state["trained"][str(w)]["ckpt"]
            done = state["distilled"].get(key)
            if (done and done["steps"] == opt.distill_steps and done["teacher"] == teacher
                    and Path(done["ckpt"]).is_file()):
                continue
            ckpt, seconds = train_width(distill_cfg, f"scaling_c{w}_distilled", w, opt.distill_steps, ae, opt.logdir,
                                        [f"model.params.ckpt_path={teacher}"])
            state["distilled"][key] = {"ckpt": ckpt, "teacher": teacher, "steps": opt.distill_steps, "seconds": seconds,
                                       "distill_flops": DISTILL_FORWARDS_PER_STEP * flops[w] * batch
                                       * opt.distill_steps}
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
    sweeps = [(w, False) for w in opt.widths] + ([(w, True) for w in opt.widths] if opt.distill else [])
    for w, distilled in sweeps:
        info = state["distilled" if distilled else "trained"][str(w)]
        model, _ = load_for_sampling(info["ckpt"], device=device)
        torch.manual_seed(0)
        settings = {"checkpoint_sha256": file_hash(info["ckpt"]), "width": w, "n": opt.n, "seed": opt.seed,
                    "train_steps": info["steps"], "evaluation": evaluator.settings()}
        extra = {"width": w, "unet_params": count_parameters(model.model), "train_steps": info["steps"],
                 "train_seconds": info["seconds"], "distilled": distilled}
        cells = grid(["consistency"], opt.distilled_steps, opt.scales) if distilled else \
            grid(opt.samplers, opt.steps, opt.scales)
        conditions = conditions_for(model, opt.n)
        # a student's guidance embedding costs one small MLP per sample: its forwards are counted at the UNet's FLOPs
        got = run_grid(model, cells, evaluator, conditions, n=opt.n, seed=opt.seed, batch_size=opt.batch_size,
                       outdir=out / (f"c{w}_distilled" if distilled else f"c{w}"), settings=settings,
                       save_samples=False, flops_per_forward=flops[w], reference_flops=smallest, extra=extra)
        rows += [{**r, "distilled": distilled} for r in got]  # also on rows kept from an earlier run
    cols = ["width", "unet_params", "distilled", "train_steps", "train_seconds", "sampler", "steps", "scale",
            "forwards_per_sample", "normalized_cost", "domain_fid", "class_accuracy", "sampling_seconds"]
    write_csv(rows, out / "study.csv", cols)
    best = best_rows(rows)
    write_csv(best, out / "best.csv", cols)
    plot(best, out / "scaling_study.png")
    total_sampling = sum(r["sampling_seconds"] + r["metric_seconds"] for r in rows)
    if opt.distill:
        table = distillation_summary(rows, max(opt.distilled_steps))
        write_csv(table, out / "distillation.csv", list(table[0]) if table else ["width"])
        plot_distillation(rows, out / "distillation.png")
        print("width  student FID (cost)  undistilled FID at that cost  cost to match  factor")
        for t in table:
            same = t["undistilled_same_cost_domain_fid"]
            print(f"{t['width']:5d}  {t['student_domain_fid']:7.3f} ({t['normalized_cost']:6.1f})  "
                  f"{'-' if same is None else f'{same:.3f}':>10s} ({t['undistilled_same_cost_setting']})  "
                  f"{t['undistilled_matching_cost'] or '-'}  {t['cost_factor'] or '-'}")
    summary = {"train_seconds": {k: v["seconds"] for k, v in state["trained"].items()},
               "distill_seconds": {k: v["seconds"] for k, v in state.get("distilled", {}).items()},
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
