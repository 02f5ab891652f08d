"""The quickstart: train the shapes autoencoder, then the shapes text-to-image LDM on its latents, then sample.

    make quickstart          # or: python scripts/quickstart.py

Both runs stay under logs/ (`*_quickstart_ae`, `*_quickstart_txt2img`), the samples go to
outputs/quickstart/. The LDM trains for a fixed wall-clock budget (`--ldm-minutes`), so the whole job
fits in about 15 minutes on a 2-core CPU whatever the machine's speed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae-steps", type=int, default=1000)
    p.add_argument("--ldm-minutes", type=float, default=7.5)
    p.add_argument("--logdir", default="logs")
    p.add_argument("--outdir", default="outputs/quickstart")
    args = p.parse_args()
    from ldm.inference import latest_run

    py = sys.executable
    t0 = time.time()
    run([py, "main.py", "--base", "configs/autoencoder/shapes_kl_f4.yaml", "-t", "-n", "quickstart_ae", "-l", args.logdir,
         f"lightning.trainer.max_steps={args.ae_steps}",
         f"model.params.scheduler_config.params.max_decay_steps={args.ae_steps}",
         "lightning.trainer.enable_progress_bar=false"])
    ae = latest_run(args.logdir, "quickstart_ae") / "checkpoints" / "last.ckpt"
    t1 = time.time()
    secs = int(args.ldm_minutes * 60)
    run([py, "main.py", "--base", "configs/ldm/shapes_txt2img.yaml", "-t", "-n", "quickstart_txt2img", "-l", args.logdir,
         f"model.params.first_stage_config.params.ckpt_path={ae}",
         f"lightning.trainer.max_time={{minutes: {secs // 60}, seconds: {secs % 60}}}",
         "lightning.trainer.enable_progress_bar=false"])
    ldm = latest_run(args.logdir, "quickstart_txt2img") / "checkpoints" / "last.ckpt"
    t2 = time.time()
    run([py, "scripts/txt2img.py", "--ckpt", str(ldm), "--from-file", "data/quickstart_prompts.txt", "--n_samples", "1",
         "--outdir", args.outdir])
    t3 = time.time()
    print(f"quickstart done in {t3 - t0:.0f} s (autoencoder {t1 - t0:.0f} s, LDM {t2 - t1:.0f} s, sampling {t3 - t2:.0f} s)")
    print(f"autoencoder: {ae}\nLDM: {ldm}\nsamples: {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
