"""Benchmark: train the shapes KL-f4 autoencoder with main.py and report wall time and validation PSNR.

    python benchmarks/ae_shapes.py [extra key=value overrides]

Runs `main.py --base configs/autoencoder/shapes_kl_f4.yaml -t` in a subprocess, then reads the run's
CSV log: the validation PSNR at every check, the wall time of the run, and the first step at which
validation PSNR reached 30 dB.
"""
from __future__ import annotations

import csv
import glob
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/autoencoder/shapes_kl_f4.yaml"
TARGET_DB = 30.0


def main() -> int:
    logdir = ROOT / "logs"
    name = f"bench_ae_{int(time.time())}"
    cmd = [sys.executable, "main.py", "--base", CONFIG, "-t", "-n", name, "-l", str(logdir),
           "lightning.trainer.enable_progress_bar=false"] + sys.argv[1:]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(f"training failed with exit code {proc.returncode}")
        return proc.returncode
    run = Path(sorted(glob.glob(str(logdir / f"*_{name}")))[-1])
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    vals = [(int(r["step"]), float(r["val/psnr"])) for r in rows if r.get("val/psnr")]
    print(f"run dir: {run}")
    print(f"wall time (process, incl. start-up and validation): {wall:.0f} s")
    for step, psnr in vals:
        print(f"  step {step:>6}: val PSNR {psnr:.2f} dB")
    hit = next((s for s, p in vals if p >= TARGET_DB), None)
    print(f"final val PSNR: {vals[-1][1]:.2f} dB; first >= {TARGET_DB} dB at step: {hit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
