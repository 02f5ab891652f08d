"""Benchmark: main.py's training step against a bare PyTorch loop on the same model, data and optimizer (issue 25).

    python benchmarks/train_step_overhead.py [--which ldm ae] [--steps 300] [--warmup 50] [--rounds 2] [--compile] \
        [--compile_mode MODE] [--device cpu|cuda] [--bare_only] [--keep_denormals] [--set KEY=VALUE ...] \
        [--sync_check] [--profile] [--split]

For each model (the shapes text-to-image LDM of the quickstart, batch 64 of cached 8x8x4 latents; the shapes
KL-f4 autoencoder, batch 16 of 32x32 images), in alternating rounds:
- main.py trains `--steps` steps with its default callbacks (checkpointing, image logging, CSV logging, progress
  off) and `ldm.callbacks.StepTimer` times the steps after `--warmup`;
- a bare loop in this process builds the same model from the same config, takes batches from the same data
  module, and runs the module's own loss (`shared_step`; the autoencoder's reconstruction loss), backward, the
  optimizer and scheduler steps and the EMA update, timed over the same steps.
Prints the mean ms per step (main.py's validation, checkpoints and image logging included, when they fall in the
timed steps) and the median (the step itself) of each, and the ratios main.py / bare (<= 1.10 is the goal). The
LDM's autoencoder is a random-weights checkpoint written once (the step's cost does not depend on the weights).
`--compile` sets model.params.compile (ldm.compile) in both; `--compile_mode reduce-overhead` records CUDA graphs.
`--set` adds config overrides to both (e.g. the text encoder's path). Subnormal floats are flushed to zero, as
main.py does by default; `--bare_only --keep_denormals` times the bare loop without that, for the comparison.
`--device cuda` runs both on the GPU (main.py with `lightning.trainer.accelerator=gpu`, the bare loop with the model
and each batch moved there); step times are then throughput over the timed steps, as a training run sees them (no
synchronisation is added). With `--sync_check` (CUDA) the bare loop runs 10 more steps under torch's sync debug
mode and counts the host-device synchronisations it reports; `--profile` writes a torch.profiler table of 5 bare
steps (CPU time per op, CUDA kernel count) to the work folder.

`--split` (the LDM) divides each step's wall time, in both loops, into the host time of the work the two share
(the batch's fetch, the loss, backward, the optimizer's step without Lightning's closure inside it, the EMA update)
and the rest: in main.py the rest is Lightning's loop, hooks and callbacks; in the bare loop, its few lines and the
frees. The difference of the two rests is what main.py's loop adds, read from one run of each rather than from the
difference of two noisy step times. On a GPU the parts are host times (launches are asynchronous), which is what
bounds a small model's step there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.precision import flush_denormals  # noqa: E402
from ldm.util import instantiate_from_config, load_config  # noqa: E402

CONFIGS = {"ldm": "configs/ldm/shapes_txt2img.yaml", "ae": "configs/autoencoder/shapes_kl_f4.yaml"}


def random_autoencoder(workdir: Path) -> Path:
    """A checkpoint of the shapes autoencoder at initialisation (the LDM config needs one for its latents)."""
    path = workdir / "ae_init.ckpt"
    if not path.exists():
        torch.manual_seed(0)
        ae = instantiate_from_config(load_config(ROOT / CONFIGS["ae"]).model)
        torch.save({"state_dict": ae.state_dict()}, path)
    return path


EXTRA: list[str] = []  # --set


class WorkClock:
    """Host time, per step, inside the work a training step shares with the bare loop (`--split`): each wrapped
    call's time less that of the wrapped calls inside it; Lightning's closure counts as not work, so the optimizer
    step's own time excludes the forward and backward it runs."""

    def __init__(self) -> None:
        self.work, self.stack = 0.0, []

    def wrap(self, owner: type, name: str, work: bool = True) -> None:
        import functools
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                children = self.stack.pop()
                if work:
                    self.work += elapsed - children
                if self.stack:
                    self.stack[-1] += elapsed
        setattr(owner, name, timed)

    def install(self) -> "WorkClock":
        import torch.utils.data.dataloader as dataloader
        from pytorch_lightning.loops.optimization.automatic import Closure

        from ldm.models.diffusion.latent import LatentDiffusion
        from ldm.modules.ema import LitEma
        self.wrap(dataloader._BaseDataLoaderIter, "__next__")
        self.wrap(LatentDiffusion, "shared_step")
        self.wrap(torch.Tensor, "backward")
        self.wrap(torch.optim.AdamW, "step")
        self.wrap(LitEma, "forward")
        self.wrap(Closure, "__call__", work=False)
        return self

    def take(self) -> float:
        """The work's seconds since the last call."""
        work, self.work = self.work, 0.0
        return work


def split_summary(marks: list[tuple[float, float]]) -> dict:
    """Median ms per step of the whole step, of the shared work, and of the rest, from (time, work) marks."""
    steps = [(1000 * (b[0] - a[0]), 1000 * b[1]) for a, b in zip(marks, marks[1:])]
    return {"step_ms": statistics.median(g for g, _ in steps), "work_ms": statistics.median(w for _, w in steps),
            "rest_ms": statistics.median(g - w for g, w in steps), "steps": len(steps)}


def main_split(out: str, argv: list[str]) -> int:
    """main.py in this process with the work clock installed; the split of its timed steps written to `out`."""
    import pytorch_lightning as pl
    sys.path.insert(0, str(ROOT))
    import main as main_py
    clock, marks = WorkClock().install(), []
    warmup = int(argv.pop(0))

    class Marks(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now, work = time.perf_counter(), clock.take()
            if trainer.global_step >= warmup:
                marks.append((now, work))

    build = main_py.build_trainer_kwargs

    def with_marks(*args, **kwargs) -> dict:
        kw = build(*args, **kwargs)
        kw["callbacks"].append(Marks())
        return kw
    main_py.build_trainer_kwargs = with_marks
    rc = main_py.main(argv)
    if rc == 0 and len(marks) < 2:
        print(f"--split: main.py timed {len(marks)} steps after a warm-up of {warmup}: raise --steps", file=sys.stderr)
        return 1
    if rc == 0:
        Path(out).write_text(json.dumps(split_summary(marks)))
    return rc


def overrides(which: str, workdir: Path, steps: int, compile_, device: str = "cpu") -> list[str]:
    out = [f"lightning.trainer.max_steps={steps}", "lightning.trainer.enable_progress_bar=false",
           f"lightning.trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "lightning.trainer.devices=1"]
    if which == "ldm":
        out.append(f"model.params.first_stage_config.params.ckpt_path={random_autoencoder(workdir)}")
        if load_config(ROOT / CONFIGS["ldm"]).data.params.train.target.endswith("CachedLatents"):
            out.append(f"data.params.train.params.cache_dir={workdir / 'latents'}")
    if compile_:
        out.append(f"model.params.compile={'true' if compile_ is True else compile_}")
    return out + [o for o in EXTRA if which == "ldm" or not o.startswith("model.params.cond_stage_config")]


def run_main(which: str, workdir: Path, steps: int, warmup: int, compile_,
             device: str, split: bool = False):
    """Mean and median ms per step of main.py after `warmup` steps (StepTimer); with `split`, the split_summary."""
    out = workdir / f"step_time_{which}.json"
    out.unlink(missing_ok=True)
    split_out = workdir / f"split_{which}.json"
    head = ([sys.executable, __file__, "--_main_split", str(split_out), str(warmup)] if split
            else [sys.executable, "main.py"])
    cmd = [*head, "--base", CONFIGS[which], "-t", "-n", f"overhead_{which}", "-l",
           str(workdir / "logs"), *overrides(which, workdir, steps, compile_, device),
           "lightning.callbacks.step_timer.target=ldm.callbacks.StepTimer",
           f"lightning.callbacks.step_timer.params.warmup={warmup}", f"lightning.callbacks.step_timer.params.out={out}"]
    log = workdir / f"main_{which}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"main.py exited with {rc} (log {log}):\n{tail}")
    if split:
        return json.loads(split_out.read_text())
    result = json.loads(out.read_text())
    return result["ms_per_step"], result["median_ms"]


def run_bare(which: str, workdir: Path, steps: int, warmup: int, compile_, device: str,
             sync_check: bool = False, profile: bool = False, clock: Optional[WorkClock] = None):
    """Mean and median ms per step of a plain loop over the same model, data module and optimizer (the modules'
    train / eval modes left as built, as Lightning leaves them); with `clock`, the split_summary."""
    from pytorch_lightning.utilities import move_data_to_device
    cfg = OmegaConf.merge(load_config(ROOT / CONFIGS[which]),
                          OmegaConf.from_dotlist(overrides(which, workdir, steps, compile_, device)))
    torch.manual_seed(23)
    model = instantiate_from_config(cfg.model).to(device)
    model.configure_model()
    data = instantiate_from_config(cfg.data)
    data.prepare_data()
    data.setup("fit")
    model.learning_rate = cfg.model.base_learning_rate * cfg.data.params.batch_size  # main.py's --scale_lr, 1 device
    optimizers = model.configure_optimizers()
    if isinstance(optimizers, tuple) or (isinstance(optimizers, list) and isinstance(optimizers[0], list)):
        opts, scheds = optimizers[0], [s["scheduler"] if isinstance(s, dict) else s for s in optimizers[1]]
    else:
        opts, scheds = (optimizers if isinstance(optimizers, list) else [optimizers]), []
    opt = opts[0]

    def one_step(batch, step: int) -> None:
        batch = move_data_to_device(batch, torch.device(device))
        if which == "ldm":
            if step == 0:
                model.on_train_batch_start(batch, 0)
            loss, _ = model.shared_step(batch)
        else:
            x = model.get_input(batch)
            rec, aux = model._forward_train(x)
            loss, _ = model._loss_call(x, rec, aux, 0, "train", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for s in scheds:
            s.step()
        if getattr(model, "use_ema", False):
            model.model_ema(model.model)

    def batches():
        while True:
            yield from data.train_dataloader()

    source = batches()
    times, marks = [], []
    for step in range(steps):
        one_step(next(source), step)
        now, work = time.perf_counter(), clock.take() if clock else 0.0
        if step + 1 >= warmup:
            times.append(now)
            marks.append((now, work))
    if clock:
        return split_summary(marks)
    gaps = [1000 * (b - a) for a, b in zip(times, times[1:])]
    if sync_check and device == "cuda":
        import warnings
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for step in range(steps, steps + 10):
                    one_step(next(source), step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught  # (the mode's own notice that it is a prototype aside)
                 if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)]
        print(f"bare loop, {which}: {len(syncs)} host-device synchronisations in 10 steps"
              + (f"; first: {syncs[0]}" if syncs else ""), flush=True)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for step in range(steps + 10, steps + 15):
                one_step(next(source), step)
            if device == "cuda":
                torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        path = workdir / f"profile_{which}_{device}{'_compiled' if compile_ else ''}.txt"
        path.write_text(f"{kernels / 5:.0f} CUDA kernels per step\n{table}")
        print(f"bare loop, {which}: {kernels / 5:.0f} CUDA kernels per step; profile in {path}", flush=True)
    return statistics.mean(gaps), statistics.median(gaps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", nargs="*", default=["ldm", "ae"], choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2, help="alternating main.py / bare rounds; medians reported")
    p.add_argument("--compile", action="store_true", help="model.params.compile=true in both")
    p.add_argument("--compile_mode", default=None, help="model.params.compile=MODE in both (implies --compile)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both")
    p.add_argument("--sync_check", action="store_true", help="count host-device syncs of the bare step (CUDA)")
    p.add_argument("--profile", action="store_true", help="a torch.profiler table of 5 bare steps")
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bare_only", action="store_true", help="time the bare loop only")
    p.add_argument("--keep_denormals", action="store_true", help="do not flush subnormals (with --bare_only)")
    p.add_argument("--split", action="store_true",
                   help="the LDM's step split into the work both loops share and the rest (see above)")
    p.add_argument("--ldm_config", default=CONFIGS["ldm"],
                   help="the LDM's config (e.g. configs/ldm/shapes_uncond.yaml where the MiniLM wheel is missing)")
    if len(sys.argv) > 2 and sys.argv[1] == "--_main_split":  # run_main's child: main.py with the work clock
        flush_denormals()
        return main_split(sys.argv[2], sys.argv[3:])
    args = p.parse_args()
    if args.steps < args.warmup + 3:
        p.error(f"--steps {args.steps} leaves fewer than 3 steps to time after --warmup {args.warmup}")
    if args.split and (args.which != ["ldm"] or args.bare_only):
        p.error("--split times the LDM's main.py and bare loop: use it with --which ldm, without --bare_only")
    if args.keep_denormals and not args.bare_only:
        p.error("--keep_denormals needs --bare_only (main.py flushes them by default)")
    flushed = False if args.keep_denormals else flush_denormals()  # as main.py does, before torch starts its threads
    CONFIGS["ldm"] = args.ldm_config
    EXTRA.extend(args.set)
    compile_ = args.compile_mode or args.compile
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ldm_overhead_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; {args.steps} steps, "
          f"timed after {args.warmup}; compile {compile_}; subnormals flushed in every thread: {flushed}")
    if args.bare_only:
        for which in args.which:
            runs = [run_bare(which, workdir, args.steps, args.warmup, compile_, args.device,
                             args.sync_check and r == 0, args.profile and r == 0) for r in range(args.rounds)]
            per_round = "; ".join(f"{m:.1f} / {d:.1f}" for m, d in runs)
            print(f"bare loop, {which}: mean / median ms per step, by round: {per_round}")
        return 0
    if args.split:
        return report_split(args, workdir, compile_)
    print("| model | main.py ms/step: mean / median | bare loop: mean / median | main.py / bare: mean / median |")
    print("| --- | ---: | ---: | ---: |")
    for which in args.which:
        runs = []
        for r in range(args.rounds):
            runs.append(run_main(which, workdir, args.steps, args.warmup, compile_, args.device)
                        + run_bare(which, workdir, args.steps, args.warmup, compile_, args.device,
                                   args.sync_check and r == 0, args.profile and r == 0))
        mm, md, bm, bd = (statistics.median(r[k] for r in runs) for k in range(4))
        rounds = "; ".join("/".join(f"{v:.1f}" for v in r) for r in runs)
        print(f"| {which} | {mm:.1f} / {md:.1f} | {bm:.1f} / {bd:.1f} | **{mm / bm:.3f}** / **{md / bd:.3f}** "
              f"(rounds, main mean/median/bare mean/median: {rounds}) |", flush=True)
    return 0


def report_split(args, workdir: Path, compile_) -> int:
    """--split: per round, the median step, shared work and rest of main.py and of the bare loop."""
    clock = WorkClock().install()
    print("| round | main.py: step / work / rest ms | bare loop: step / work / rest ms | main.py's rest - bare's |")
    print("| --- | ---: | ---: | ---: |")
    for r in range(args.rounds):
        m = run_main("ldm", workdir, args.steps, args.warmup, compile_, args.device, split=True)
        b = run_bare("ldm", workdir, args.steps, args.warmup, compile_, args.device, clock=clock)
        print(f"| {r + 1} | {m['step_ms']:.2f} / {m['work_ms']:.2f} / {m['rest_ms']:.2f} | {b['step_ms']:.2f} / "
              f"{b['work_ms']:.2f} / {b['rest_ms']:.2f} | **{m['rest_ms'] - b['rest_ms']:+.2f}** |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
