"""The video quickstart: the shapes text-to-image LDM of the quickstart learns motion on moving shapes.

    make video-quickstart          # or: python scripts/video_quickstart.py

Takes the newest quickstart runs under --logdir (`*_quickstart_ae`, `*_quickstart_txt2img`; `make quickstart`
first, or --image-run / --ae-run), trains the temporal layers of configs/video/shapes_txt2video.yaml for the
wall-clock time left in --total-minutes (less a reserve for start-up, latent caching and sampling), then writes
clips for data/video_prompts.txt to --outdir with scripts/txt2video.py. The run stays under logs/
(`*_video_shapes`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import run  # noqa: E402  (echo a command, run it in the repository root)

CONFIG = "configs/video/shapes_txt2video.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--total-minutes", type=float, default=10.0, help="wall-clock budget of the whole job")
    p.add_argument("--reserve-seconds", type=int, default=120,
                   help="kept back from training for start-up, latent caching and sampling")
    p.add_argument("--train-minutes", type=float, default=None, help="fixed training time (overrides the budget)")
    p.add_argument("--image-run", default=None, help="the image LDM run (default: the newest *_quickstart_txt2img)")
    p.add_argument("--ae-run", default=None, help="the autoencoder run (default: the newest *_quickstart_ae)")
    p.add_argument("--logdir", default="logs")
    p.add_argument("--outdir", default="outputs/video_quickstart")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) for the video run")
    args = p.parse_args()
    from ldm.runs import RunDir, latest_run

    t0 = time.time()
    try:
        image = RunDir(args.image_run or latest_run(args.logdir, "quickstart_txt2img")).last
        ae = RunDir(args.ae_run or latest_run(args.logdir, "quickstart_ae")).last
    except FileNotFoundError as e:
        print(f"error: {e}; run `make quickstart` first (or give --image-run and --ae-run)", file=sys.stderr)
        return 2
    secs = int(args.train_minutes * 60 if args.train_minutes is not None
               else args.total_minutes * 60 - args.reserve_seconds)
    if secs < 60:
        print(f"error: only {secs} s left for training within --total-minutes {args.total_minutes}", file=sys.stderr)
        return 2
    py = sys.executable
    print(f"video training budget: {secs} s", flush=True)
    run([py, "main.py", "--base", CONFIG, "-t", "-n", "video_shapes", "-l", args.logdir,
         f"model.params.image_ckpt_path={image}", f"model.params.first_stage_config.params.ckpt_path={ae}",
         f"lightning.trainer.max_time={{minutes: {secs // 60}, seconds: {secs % 60}}}",
         f"data.params.train.params.cache_dir={Path(args.logdir) / 'latent_cache'}",
         "lightning.trainer.enable_progress_bar=false", *args.overrides])
    video = RunDir(latest_run(args.logdir, "video_shapes")).last
    t1 = time.time()
    run([py, "scripts/txt2video.py", "--ckpt", str(video), "--from-file", "data/video_prompts.txt", "--n_samples", "10",
         "--grid_upscale", "2", "--grid_captions", "--outdir", args.outdir])
    t2 = time.time()
    print(f"video quickstart done in {t2 - t0:.0f} s (training {t1 - t0:.0f} s, sampling {t2 - t1:.0f} s)")
    print(f"image LDM: {image}\nvideo LDM: {video}\nclips: {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
