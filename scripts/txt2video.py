"""Text-to-video sampling with a video LDM (ldm.models.diffusion.video), with the txt2img flags where they apply.

    python scripts/txt2video.py --ckpt logs/<ts>_video_shapes/checkpoints/last.ckpt \\
        --prompt "a large red circle moving right" --n_samples 4 --frames 8 --fps 8

Writes, for clip NNNNN (numbering continues what is there): <outdir>/clips/NNNNN.mp4 (H.264), NNNNN.gif and its
frames as <outdir>/clips/NNNNN/FFF.png (PNG text carries prompt, seed, sampler, steps, scale and the checkpoint
hash), plus one frame strip per run, <outdir>/strip-NNNN.png (a row per clip, its frames side by side). Clip k of a
run uses seed + k, so a seed gives the same clips whatever the --n_samples / --n_iter split.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ldm.cli import (UsageError, add_model_arguments, add_output_arguments, add_prompt_arguments,
                     add_sampling_arguments, check_options, grid_image, guidance_scale, latent_shape,
                     load_from_arguments, next_number, precision, prompt_batches, sampler_name)
from ldm.data.video_io import write_gif, write_mp4
from ldm.errors import entry_point
from ldm.files import check_output_folder, file_hash, save_png, to_uint8
from ldm.generation import image_seeds, sample_prompts
from ldm.models.diffusion.video import VideoLatentDiffusion
from ldm.sampling.registry import eta_option


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    """--frames, --fps and --decode_chunk, shared by the video scripts."""
    g = p.add_argument_group("video")
    g.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's num_frames)")
    g.add_argument("--fps", type=float, default=8.0, help="frame rate of the written MP4 / GIF")
    g.add_argument("--decode_chunk", type=int, default=None,
                   help="frames the first stage decodes at once (bounded memory; default: the model's frame_chunk)")


def check_video_options(opt: argparse.Namespace) -> None:
    if opt.frames is not None and opt.frames < 1:
        raise UsageError(f"--frames {opt.frames}: give at least 1")
    if opt.fps <= 0:
        raise UsageError(f"--fps {opt.fps}: give a positive frame rate")
    if opt.decode_chunk is not None and opt.decode_chunk < 1:
        raise UsageError(f"--decode_chunk {opt.decode_chunk}: give at least 1")


def video_model_settings(model, opt: argparse.Namespace) -> int:
    """The frames per clip, after checking that the checkpoint is a video model and applying --decode_chunk."""
    if not isinstance(model, VideoLatentDiffusion):
        raise UsageError(f"--ckpt {opt.ckpt}: a {type(model).__name__}, not a video model (VideoLatentDiffusion); "
                         f"for images use scripts/txt2img.py")
    if opt.decode_chunk is not None:
        model.frame_chunk = opt.decode_chunk
    return opt.frames or model.num_frames


def write_clip(folder: Path, number: int, frames: np.ndarray, fps: float, meta: dict) -> None:
    """NNNNN.mp4, NNNNN.gif and NNNNN/FFF.png of one clip (T, H, W, C) uint8."""
    write_mp4(folder / f"{number:05}.mp4", frames, fps)
    write_gif(folder / f"{number:05}.gif", frames, fps)
    (folder / f"{number:05}").mkdir()
    for t, frame in enumerate(frames):
        save_png(frame, folder / f"{number:05}" / f"{t:03}.png", {**meta, "frame": t})


def frame_strip_image(clips: list[np.ndarray], upscale: int, captions: list[str] | None) -> np.ndarray:
    """One image of the run: a row per clip (T, H, W, C), its frames side by side."""
    rows = np.stack([np.concatenate(list(c), axis=1) for c in clips])  # (N, H, T W, C)
    if rows.shape[-1] == 1:
        rows = np.repeat(rows, 3, axis=-1)
    return grid_image(rows, 1, upscale, captions)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_prompt_arguments(p, default="a large red circle moving right")
    add_sampling_arguments(p, n_samples=2, n_iter=1, scale=None)
    add_output_arguments(p, "outputs/txt2video-samples")
    add_video_arguments(p)
    add_model_arguments(p)
    return p


@entry_point
def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    check_options(opt)
    check_video_options(opt)
    sampler, prec = sampler_name(opt), precision(opt)
    eta_option(sampler, opt.ddim_eta)  # refused before any work
    batches = prompt_batches(opt)
    out = Path(opt.outdir)
    clips_dir = out / "clips"
    check_output_folder(clips_dir, "--outdir")  # numbered files never replace any
    model, cfg = load_from_arguments(opt)
    frames = video_model_settings(model, opt)
    sampler, opt.spacing = sampler_name(opt, model), opt.spacing or model.sample_spacing
    eta_option(sampler, opt.ddim_eta)
    c, h, w = latent_shape(model, opt.H, opt.W, opt.C, opt.f)
    scale = guidance_scale(opt, cfg, model)
    clips_dir.mkdir(parents=True, exist_ok=True)
    count = next_number(clips_dir, r"(\d+)\.mp4")
    ckpt_hash = file_hash(opt.ckpt)
    strip, captions, k = [], [], 0
    for prompts in tqdm([p for _ in range(opt.n_iter) for p in batches], desc="sampling"):
        seeds = image_seeds(opt.seed, k, len(prompts))
        video = sample_prompts(model, prompts, steps=opt.steps, sampler=sampler, scale=scale, seed=seeds,
                               eta=opt.ddim_eta, use_ema=not opt.no_ema, precision=prec, shape=(c, frames, h, w),
                               spacing=opt.spacing, rescale=opt.guidance_rescale)  # (B, C, T, H, W)
        for i in range(video.shape[0]):
            clip = to_uint8(video[i].movedim(1, 0))  # (T, H, W, C)
            if not opt.skip_save:
                write_clip(clips_dir, count, clip, opt.fps,
                           {"prompt": prompts[i], "seed": seeds[i], "sampler": sampler, "spacing": opt.spacing,
                            "steps": opt.steps, "scale": scale, "eta": opt.ddim_eta, "frames": frames, "fps": opt.fps,
                            "ckpt": opt.ckpt, "ckpt_sha256": ckpt_hash})
                count += 1
            strip.append(clip)
        k += len(prompts)
        captions += prompts
    if not opt.skip_grid:
        image = frame_strip_image(strip, opt.grid_upscale, captions if opt.grid_captions else None)
        number = next_number(out, r"strip-(\d+)\.png")
        save_png(image, out / f"strip-{number:04}.png", {"prompts": " | ".join(dict.fromkeys(captions)),
                                                         "seed": opt.seed, "sampler": sampler, "steps": opt.steps,
                                                         "scale": scale, "ckpt_sha256": ckpt_hash})
    print(f"Your clips are ready and waiting for you here: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
