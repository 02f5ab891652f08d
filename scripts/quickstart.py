"""The quickstart: train the shapes autoencoder, then the shapes text-to-image LDM on its latents, then sample.

    make quickstart          # or: python scripts/quickstart.py

Both runs stay under logs/ (`*_quickstart_ae`, `*_quickstart_txt2img`), the samples go to
outputs/quickstart/. The autoencoder trains for a fixed number of steps; the LDM then trains for the
wall-clock time left in `--total-minutes`, less a reserve for its start-up (including encoding the
training set into cached latents, `ldm.data.latents`) and for sampling, so the whole job fits in
about 15 minutes on a 2-core CPU whatever the machine's speed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ae-steps", type=int, default=1200)
    p.add_argument("--total-minutes", type=float, default=14.5, help="wall-clock budget of the whole job")
    p.add_argument("--reserve-seconds", type=int, default=100,
                   help="kept back from the LDM's training time for its start-up, latent caching and sampling")
    p.add_argument("--ldm-minutes", type=float, default=None, help="fixed LDM training time (overrides the budget)")
    p.add_argument("--logdir", default="logs")
    p.add_argument("--outdir", default="outputs/quickstart")
    args = p.parse_args()
    from ldm.runs import RunDir, latest_run

    py = sys.executable
    t0 = time.time()
    run([py, "main.py", "--base", "configs/autoencoder/shapes_kl_f4.yaml", "-t", "-n", "quickstart_ae", "-l", args.logdir,
         f"lightning.trainer.max_steps={args.ae_steps}",
         f"model.params.scheduler_config.params.max_decay_steps={args.ae_steps}",
         "lightning.trainer.enable_progress_bar=false"])
    ae = RunDir(latest_run(args.logdir, "quickstart_ae")).last
    t1 = time.time()
    if args.ldm_minutes is not None:
        secs = int(args.ldm_minutes * 60)
    else:
        secs = int(args.total_minutes * 60 - (t1 - t0) - args.reserve_seconds)
    if secs < 60:
        print(f"error: only {secs} s left for the LDM within --total-minutes {args.total_minutes}; "
              f"lower --ae-steps or raise --total-minutes", file=sys.stderr)
        return 2
    print(f"LDM training budget: {secs} s", flush=True)
    run([py, "main.py", "--base", "configs/ldm/shapes_txt2img.yaml", "-t", "-n", "quickstart_txt2img", "-l", args.logdir,
         f"model.params.first_stage_config.params.ckpt_path={ae}",
         f"lightning.trainer.max_time={{minutes: {secs // 60}, seconds: {secs % 60}}}",
         f"data.params.train.params.cache_dir={Path(args.logdir) / 'latent_cache'}",
         "lightning.trainer.enable_progress_bar=false"])
    ldm = RunDir(latest_run(args.logdir, "quickstart_txt2img")).last
    t2 = time.time()
    # 16 prompts in batches of 8, a 4-wide grid enlarged 4x with each prompt written under its image
    run([py, "scripts/txt2img.py", "--ckpt", str(ldm), "--from-file", "data/quickstart_prompts.txt", "--n_samples", "8",
         "--n_rows", "4", "--grid_upscale", "4", "--grid_captions", "--outdir", args.outdir])
    t3 = time.time()
    print(f"quickstart done in {t3 - t0:.0f} s (autoencoder {t1 - t0:.0f} s, LDM {t2 - t1:.0f} s, sampling {t3 - t2:.0f} s)")
    print(f"autoencoder: {ae}\nLDM: {ldm}\nsamples: {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
