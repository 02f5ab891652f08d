"""What the sampling scripts share: the CompVis / Stable Diffusion flags, the model flags (and loading the model they
name), image sizes, output numbering and grids.

Flags keep the names and meanings of CompVis/stable-diffusion (SD v1) and Stability-AI/stablediffusion (SD v2):
`--ddim_steps` and `--steps` are one option, `--plms`, `--dpm_solver` and `--dpm` pick a sampler as there, and
`--sampler` picks any sampler of `ldm.sampling`.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ldm.checkpoint import ModelKind
from ldm.compile import MODES, CompileSettings
from ldm.convert.lora import merge_lora_files, parse_lora_spec
from ldm.errors import InputError
from ldm.files import save_png
from ldm.generation import first_stage_factor
from ldm.precision import Precision, WeightsDType
from ldm.runs import load_for_sampling
from ldm.sampling import SAMPLERS
from ldm.core.spacing import Spacing

# The sampler the originals' DPM-Solver flags select: multistep second order with data prediction (DPM-Solver++).
DPM_SOLVER = "dpmpp_2m"
# CompVis' guidance scale default, used when the model's config does not set its own `guidance_scale`.
COMPVIS_SCALE = 7.5
REFUSED = {"torchscript": "TorchScript tracing of the UNet", "ipex": "Intel Extension for PyTorch"}


class UsageError(InputError):
    """A flag value this model or this framework cannot honour; the message names the flag."""


def add_sampling_arguments(p: argparse.ArgumentParser, *, n_samples: int, n_iter: int, scale: Optional[float],
                           steps: int = 50, seed: int = 42) -> None:
    """Sampler, guidance, size, seed and batch flags of the CompVis / SD scripts, plus --sampler and --spacing."""
    g = p.add_argument_group("sampling (CompVis / Stable Diffusion flags)")
    add_sampler_choice(g, steps)
    add_generation_arguments(g)
    g.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    g.add_argument("--scale", type=float, default=scale,
                   help="classifier-free guidance scale (default: the config's guidance_scale, else 7.5)")
    g.add_argument("--fixed_code", action="store_true", help="reuse one start code for every iteration")
    g.add_argument("--n_samples", type=int, default=n_samples, help="images per batch (a.k.a. batch size)")
    g.add_argument("--n_iter", type=int, default=n_iter, help="sample this often")
    g.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    g.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's)")
    g.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's)")
    g.add_argument("--C", type=int, default=None, help="latent channels (default: the config's)")
    g.add_argument("--f", type=int, default=None, help="first-stage downsampling factor (default: the config's)")
    g.add_argument("--seed", type=int, default=seed, help="image k of the run uses seed + k")
    g.add_argument("--bf16", action="store_true", help="sample under bfloat16 autocast (same as --precision bf16)")
    for flag, what in REFUSED.items():
        g.add_argument(f"--{flag}", action="store_true", help=f"not supported ({what}); refused with a message")


def add_generation_arguments(p) -> None:
    """--spacing and --guidance_rescale, which every task passes to `ldm.generation.generate`."""
    p.add_argument("--spacing", default=None, choices=[s.value for s in Spacing],
                   help="how the sampling steps are spread over the noise levels (default: the model's "
                        "sample_spacing, uniform unless its config says otherwise)")
    p.add_argument("--guidance_rescale", type=float, default=0.0,
                   help="guidance rescale phi in [0, 1] (Lin et al. 2023; 0.7 there): against over-exposure at high "
                        "scales, with zero-terminal-SNR models")


def add_folder_task_arguments(p: argparse.ArgumentParser, *, indir_help: str, steps: int) -> None:
    """The flags of the folder tasks (inpaint.py, superres.py): --indir, --outdir, --overwrite, the sampler, --spacing,
    --guidance_rescale, --prompt, --scale and --seed."""
    p.add_argument("--indir", type=str, required=True, help=indir_help)
    p.add_argument("--outdir", type=str, required=True, help="NAME.png results; never one of the inputs")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --outdir")
    add_sampler_choice(p, steps)
    add_generation_arguments(p)
    p.add_argument("--prompt", type=str, default=None, help="text for text-conditioned models")
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=42, help="image k of --indir (sorted) uses seed + k")


def add_sampler_choice(p, steps: int) -> None:
    """--ddim_steps / --steps, --plms, --dpm_solver / --dpm and --sampler (resolved by `sampler_name`)."""
    p.add_argument("--ddim_steps", "--steps", dest="steps", type=int, default=steps,
                   help="sampling steps (any sampler); --steps is the SD v2 name")
    p.add_argument("--plms", action="store_true", help="PLMS (same as --sampler plms)")
    p.add_argument("--dpm_solver", "--dpm", dest="dpm_solver", action="store_true",
                   help=f"DPM-Solver++ (2M), as the SD scripts' DPMSolverSampler (same as --sampler {DPM_SOLVER})")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="any sampler (default: the model config's `sampler`, else ddim)")


def add_output_arguments(p: argparse.ArgumentParser, outdir: str) -> None:
    """--outdir, --skip_grid, --skip_save and the grid options for small images."""
    g = p.add_argument_group("output")
    g.add_argument("--outdir", type=str, default=outdir, help="samples/NNNNN.png and grid-NNNN.png go here")
    g.add_argument("--skip_grid", action="store_true", help="do not write a grid")
    g.add_argument("--skip_save", action="store_true", help="do not write the single images")
    g.add_argument("--grid_upscale", type=int, default=1,
                   help="enlarge the grid by this integer factor (nearest neighbour), for small images")
    g.add_argument("--grid_captions", action="store_true", help="write each prompt under its tile in the grid")


def add_prompt_arguments(p: argparse.ArgumentParser, default: Optional[str], required: bool = False) -> None:
    """--prompt, --from-file (one prompt per line, batched n_samples at a time) and SD v2's --repeat."""
    p.add_argument("--prompt", type=str, default=default, required=required, help="the prompt to render")
    p.add_argument("--from-file", type=str, default=None,
                   help="prompts, one per line; batches of n_samples lines (as the CompVis scripts)")
    p.add_argument("--repeat", type=int, default=1, help="repeat each prompt of --from-file this often (SD v2)")


def add_model_arguments(parser, default_ckpt: Optional[str] = None, default_config: Optional[str] = None) -> None:
    """The model flags of the task scripts: --config, --ckpt, --lora, --no-ema, --unsafe-load, --device, --precision,
    --dtype, --compile."""
    hint = f", or {default_config} for the default checkpoint" if default_config else ""
    parser.add_argument("--config", type=str, default=None, help=f"default: the run's configs/*-project.yaml{hint}")
    parser.add_argument("--ckpt", type=str, default=default_ckpt, required=default_ckpt is None)
    add_lora_argument(parser)
    parser.add_argument("--no-ema", action="store_true", help="sample with the training weights, not the EMA ones")
    parser.add_argument("--unsafe-load", action="store_true", help="allow pickled objects in the checkpoint")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_precision_arguments(parser)
    add_compile_argument(parser)


def add_compile_argument(parser) -> None:
    """--compile [MODE] (see `apply_compile`)."""
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=list(MODES), metavar="MODE",
                        help=f"torch.compile the UNet and the decoder (MODE: one of {', '.join(MODES)}; default "
                             f"'default'); the first batch pays the compilation")


def apply_compile(model, opt) -> None:
    """--compile: the loaded model's UNet and first-stage decoder compiled in place (ldm.compile)."""
    if getattr(opt, "compile", None):
        names = model.compile_networks(CompileSettings(decoder=hasattr(model, "first_stage_model"), mode=opt.compile))
        print(f"torch.compile ({opt.compile}): {', '.join(names)}")

def add_lora_argument(parser) -> None:
    """--lora FILE[:SCALE], repeatable (see `apply_loras`)."""
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="merge a LoRA adapter (.safetensors: this framework's, diffusers' or kohya's layout) "
                             "into the UNet with SCALE (default 1); repeat for several")


def check_lora_files(specs) -> None:
    """Refuse, before the model is loaded, a --lora file that does not exist."""
    for spec in specs or ():
        path, _ = parse_lora_spec(spec)
        if not path.is_file():
            raise UsageError(f"--lora {spec}: no such file {path}")


def apply_loras(model, specs) -> None:
    """Merge the --lora adapters into the loaded model, saying what was merged."""
    for path, scale, layers in merge_lora_files(model, specs or ()):
        print(f"merged LoRA {path} (scale {scale:g}) into {layers} UNet layers")


def add_precision_arguments(parser) -> None:
    """--precision (autocast) and --dtype (the weights' dtype): see ldm.precision."""
    parser.add_argument("--precision", default="fp32", choices=[x.value for x in Precision],
                        help="sampling precision (autocast: float16 on CUDA, bfloat16 on CPU; full = fp32)")
    parser.add_argument("--dtype", default=WeightsDType.FP32.value, choices=[x.value for x in WeightsDType],
                        help="dtype the weights are loaded in (fp16/bf16 halve the memory; auto: the checkpoint's "
                             "own, e.g. an fp16 export stays fp16)")


def load_from_arguments(opt, default_ckpt: Optional[str] = None, default_config: Optional[str] = None):
    """The model of add_model_arguments' flags; the default checkpoint comes with its default config."""
    config = opt.config
    if config is None and default_ckpt is not None and opt.ckpt == default_ckpt:
        config = default_config
    check_lora_files(getattr(opt, "lora", None))
    model, cfg = load_for_sampling(opt.ckpt, config, allow_pickle=opt.unsafe_load, device=opt.device,
                                   dtype=getattr(opt, "dtype", None), kind=ModelKind.DIFFUSION)
    apply_loras(model, getattr(opt, "lora", None))
    apply_compile(model, opt)
    return model, cfg


# Count flags of the scripts (by their argparse dest) that must be at least 1, and amounts that must not be negative.
AT_LEAST_ONE = ("n_samples", "n_iter", "steps", "grid_upscale", "repeat", "batch_size", "custom_steps", "jump_length",
                "jump_n_sample", "tile", "tile_batch", "n", "n_reference", "kid_subset_size")
AT_LEAST_ZERO = ("ddim_eta", "eta", "overlap", "noise_level", "guidance_rescale")


def check_options(opt: argparse.Namespace) -> None:
    """Refuse what cannot be honoured before any work: SD v2's --torchscript / --ipex, counts below 1, negative
    amounts (every flag of AT_LEAST_ONE / AT_LEAST_ZERO the script has)."""
    for flag, what in REFUSED.items():
        if getattr(opt, flag, False):
            raise UsageError(f"--{flag} ({what}) is not supported here; sample without it (for speed on CPU, "
                             f"--bf16 or --precision bf16; on GPU, --precision autocast)")
    for flags, low, what in ((AT_LEAST_ONE, 1, "be at least 1"), (AT_LEAST_ZERO, 0, "not be negative")):
        for flag in flags:
            value = getattr(opt, flag, None)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None and v < low:
                    raise UsageError(f"--{flag} must {what}, got {v}")


def sampler_name(opt: argparse.Namespace, model=None) -> str:
    """The sampler named by --plms / --dpm_solver (--dpm) / --sampler; two different ones are an error. With none
    named: the model's own (its config's `sampler`, e.g. a consistency student's), else ddim."""
    picked = {name for flag, name in (("plms", "plms"), ("dpm_solver", DPM_SOLVER)) if getattr(opt, flag, False)}
    if opt.sampler:
        picked.add(opt.sampler)
    if len(picked) > 1:
        raise UsageError(f"conflicting sampler flags: {', '.join(sorted(picked))} (give one of --plms, --dpm_solver, "
                         f"--sampler NAME)")
    return picked.pop() if picked else getattr(model, "sampler_name", "ddim")


def precision(opt: argparse.Namespace) -> Precision:
    """--precision, with SD v2's --bf16 as bf16 ("full" is float32, "autocast" float16 on CUDA / bfloat16 on CPU)."""
    if getattr(opt, "bf16", False):
        if opt.precision not in (Precision.FP32.value, Precision.BF16.value, Precision.FULL.value):
            raise UsageError(f"--bf16 conflicts with --precision {opt.precision}")
        return Precision.BF16
    return Precision(opt.precision)


def guidance_scale(opt: argparse.Namespace, cfg, model, fallback: float = COMPVIS_SCALE) -> float:
    """--scale; else the config's `guidance_scale` when it sets one; else the original script's default."""
    if opt.scale is not None:
        return float(opt.scale)
    params = cfg.model.get("params", {}) if cfg is not None else {}
    if "guidance_scale" in params:
        return float(model.guidance_scale)
    return fallback


def latent_shape(model, H: Optional[int], W: Optional[int], C: Optional[int] = None,
                 f: Optional[int] = None) -> tuple[int, int, int]:
    """(C, H/f, W/f) for an H x W image; any multiple of the first stage's factor f; default the native size."""
    factor = first_stage_factor(model)
    if f is not None and f != factor:
        raise UsageError(f"--f {f}: this model's first stage downsamples by {factor}")
    if C is not None and C != model.channels:
        raise UsageError(f"--C {C}: this model's latents have {model.channels} channels")
    native = model.image_size * factor
    H, W = H or native, W or native
    for name, side in (("H", H), ("W", W)):
        if side <= 0 or side % factor:
            raise UsageError(f"--{name} {side} is not a positive multiple of the first stage's downsampling factor "
                             f"{factor} (e.g. {max(factor, side // factor * factor)} or {(side // factor + 1) * factor})")
    return model.channels, H // factor, W // factor


def prompt_batches(opt: argparse.Namespace) -> list[list[str]]:
    """[prompt] * n_samples; with --from-file, its lines (each --repeat times) in batches of n_samples."""
    if not opt.from_file:
        return [[opt.prompt] * opt.n_samples]
    path = Path(opt.from_file)
    if not path.is_file():
        raise UsageError(f"--from-file {path}: no such file")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise UsageError(f"--from-file {path}: no prompts in it")
    lines = [ln for ln in lines for _ in range(max(1, opt.repeat))]
    return [lines[i: i + opt.n_samples] for i in range(0, len(lines), opt.n_samples)]


def report_outputs(written: Sequence[str], skipped: Sequence[tuple[str, str]], out: Path) -> int:
    """Print what was written and what was skipped, with reasons; the exit code: 1 when anything was skipped."""
    print(f"wrote {len(written)} image(s) to {out}" + (f"; skipped {len(skipped)}:" if skipped else ""))
    for name, why in skipped:
        print(f"  skipped {name}: {why}", file=sys.stderr)
    return 1 if skipped else 0


def next_number(folder: Path, pattern: str) -> int:
    """One past the largest number among files named like `pattern` (a regex with one group): never overwrites."""
    rx = re.compile(pattern)
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := rx.fullmatch(p.name))] if folder.is_dir() else []
    return max(numbers) + 1 if numbers else 0


def grid_image(images: np.ndarray, nrow: int, upscale: int = 1, captions: Optional[Sequence[str]] = None,
               padding: int = 2) -> np.ndarray:
    """A grid (H, W, 3) uint8 of `images` (B, h, w, 3) uint8, `nrow` per row, enlarged (nearest), optionally captioned."""
    from PIL import Image, ImageDraw, ImageFont
    b, h, w, _ = images.shape
    h, w = h * upscale, w * upscale
    font = ImageFont.load_default()
    lines_per_tile = [_wrap(c, font, w) for c in captions] if captions else None
    line_h = (font.getbbox("Ag")[3] + 2) if captions else 0
    cap_h = max((len(ls) for ls in lines_per_tile), default=0) * line_h if lines_per_tile else 0
    ncol = max(1, min(nrow, b))
    nrows = (b + ncol - 1) // ncol
    canvas = Image.new("RGB", (ncol * (w + padding) + padding, nrows * (h + cap_h + padding) + padding), "black")
    draw = ImageDraw.Draw(canvas)
    for i, arr in enumerate(images):
        x0, y0 = padding + (i % ncol) * (w + padding), padding + (i // ncol) * (h + cap_h + padding)
        canvas.paste(Image.fromarray(arr).resize((w, h), Image.NEAREST), (x0, y0))
        for j, line in enumerate(lines_per_tile[i] if lines_per_tile else ()):
            draw.text((x0 + 1, y0 + h + 1 + j * line_h), line, fill="white", font=font)
    return np.asarray(canvas)


def write_grid(out: Path, batches: Sequence[np.ndarray], captions: Sequence[str], opt: argparse.Namespace,
               meta: dict) -> Path:
    """The run's grid as <out>/grid-NNNN.png (next free number), with --n_rows, --grid_upscale, --grid_captions."""
    grid = grid_image(np.concatenate(list(batches)), opt.n_rows or opt.n_samples, opt.grid_upscale,
                      list(captions) if opt.grid_captions else None)
    number = next_number(out, r"grid-(\d+)\.png")
    path = out / f"grid-{number:04}.png"
    save_png(grid, path, {"prompts": " | ".join(dict.fromkeys(captions)), "seed": opt.seed} | meta)
    return path


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` pixels wide in `font`."""
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and font.getlength(trial) > width - 2:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + ([cur] if cur else [])
