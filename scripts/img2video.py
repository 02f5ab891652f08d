"""Image-to-video with a video LDM trained with context frames (model.params.context_frames): the input image is the
first frame, the model predicts the rest (Align your Latents, sec. 3.2), with the txt2img flags where they apply.

    python scripts/img2video.py --ckpt logs/<ts>_video_shapes/checkpoints/last.ckpt --init-img first.png \\
        --prompt "a large red circle moving right" --n_samples 2 --frames 8 --fps 8

The image keeps its size rounded down to a multiple of the first stage's factor, unless --H/--W resize it. Output
layout as txt2video.py (clips/NNNNN.mp4, .gif, NNNNN/FFF.png, strip-NNNN.png); clip k of a run uses seed + k.
`--motion` (the motion amount of Stable Video Diffusion-style models) is refused by models without that input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from img2img import init_image  # noqa: E402
from txt2video import (add_video_arguments, check_video_options, frame_strip_image, video_model_settings,  # noqa: E402
                       write_clip)

from ldm.cli import (UsageError, add_model_arguments, add_output_arguments, add_prompt_arguments,  # noqa: E402
                     add_sampling_arguments, check_options, guidance_scale, load_from_arguments, next_number,
                     precision, prompt_batches, sampler_name)
from ldm.errors import entry_point  # noqa: E402
from ldm.files import check_output_folder, file_hash, load_image, save_png, to_uint8  # noqa: E402
from ldm.generation import generators, image_seeds, sampling_scope  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--init-img", type=str, required=True, help="the first frame")
    p.add_argument("--motion", type=float, default=None,
                   help="motion amount, for models that take it as an input (Stable Video Diffusion's motion bucket)")
    add_prompt_arguments(p, default=None)
    add_sampling_arguments(p, n_samples=2, n_iter=1, scale=None)
    add_output_arguments(p, "outputs/img2video-samples")
    add_video_arguments(p)
    add_model_arguments(p)
    return p


@entry_point
def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    check_options(opt)
    check_video_options(opt)
    sampler, prec = sampler_name(opt), precision(opt)
    if opt.ddim_eta or opt.fixed_code or opt.guidance_rescale or opt.spacing:
        raise UsageError("--ddim_eta, --fixed_code, --guidance_rescale and --spacing are not taken by image-to-video "
                         "(continue_clips samples with the model's defaults)")
    batches = prompt_batches(opt) if (opt.prompt is not None or opt.from_file) else [[None] * opt.n_samples]
    load_image(opt.init_img)  # a missing or unreadable --init-img is refused before the model is loaded
    out = Path(opt.outdir)
    clips_dir = out / "clips"
    check_output_folder(clips_dir, "--outdir")
    model, cfg = load_from_arguments(opt)
    frames = video_model_settings(model, opt)
    if getattr(model, "context_frames", None) is None:
        raise UsageError(f"--ckpt {opt.ckpt}: this video model was not trained with context frames "
                         f"(model.params.context_frames), so it cannot start from an image")
    if opt.motion is not None:
        raise UsageError(f"--motion {opt.motion}: this model has no motion input (Stable Video Diffusion-style "
                         f"models take it)")
    if frames < 2:
        raise UsageError(f"--frames {frames}: image-to-video needs at least 2 (the image and one more)")
    model.num_frames = frames
    sampler = sampler_name(opt, model)
    scale = guidance_scale(opt, cfg, model)
    first = init_image(opt.init_img, model, opt.H, opt.W)[:, :, None]  # (1, C, 1, H, W)
    clips_dir.mkdir(parents=True, exist_ok=True)
    count = next_number(clips_dir, r"(\d+)\.mp4")
    ckpt_hash = file_hash(opt.ckpt)
    strip, captions, k = [], [], 0
    for prompts in tqdm([p for _ in range(opt.n_iter) for p in batches], desc="img2video"):
        seeds = image_seeds(opt.seed, k, len(prompts))
        with sampling_scope(model, not opt.no_ema, prec, "img2video"):
            video = model.continue_clips(first.repeat(len(prompts), 1, 1, 1, 1), 1,
                                         prompts=None if prompts[0] is None else list(prompts), steps=opt.steps,
                                         sampler=sampler, scale=scale, generator=generators(seeds, model.device))
        for i in range(video.shape[0]):
            clip = to_uint8(video[i].movedim(1, 0))
            if not opt.skip_save:
                write_clip(clips_dir, count, clip, opt.fps,
                           {"prompt": prompts[i] or "", "init_img": opt.init_img, "seed": seeds[i],
                            "sampler": sampler, "steps": opt.steps, "scale": scale, "frames": frames, "fps": opt.fps,
                            "ckpt": opt.ckpt, "ckpt_sha256": ckpt_hash})
                count += 1
            strip.append(clip)
        k += len(prompts)
        captions += [p or "" for p in prompts]
    if not opt.skip_grid:
        number = next_number(out, r"strip-(\d+)\.png")
        save_png(frame_strip_image(strip, opt.grid_upscale, captions if opt.grid_captions else None),
                 out / f"strip-{number:04}.png", {"init_img": opt.init_img, "seed": opt.seed, "sampler": sampler,
                                                  "steps": opt.steps, "scale": scale, "ckpt_sha256": ckpt_hash})
    print(f"Your clips are ready and waiting for you here: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
