"""Loading trained runs for sampling, and batched text-to-image sampling with PNG metadata (used by scripts)."""
from __future__ import annotations

import contextlib
import glob
import hashlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, PngImagePlugin

from ldm.checkpoint import ModelKind, require_kind
from ldm.files import atomic_path, read_image
from ldm.precision import Precision, WeightsDType, precision_scope
from ldm.sampling import CFGDenoiser, get_sigmas, img2img_start, randn_like, sample
from ldm.sampling.registry import eta_option
from ldm.util import ConfigError, get_obj_from_str, load_config, load_model_from_config


def default_device() -> str:
    """CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def generators(seed: Union[int, Sequence[int]], device: Union[str, torch.device]):
    """One generator for an int seed; one per image for a list (each image then reproduces from its own seed)."""
    if isinstance(seed, int):
        return torch.Generator(device=device).manual_seed(seed)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]


def first_stage_factor(model) -> int:
    """The first stage's downsampling factor f (image side / latent side); 1 for a pixel-space model."""
    fs = getattr(model, "first_stage_model", None)
    enc = getattr(fs, "encoder", None)
    return 2 ** (len(enc.down) - 1) if enc is not None and hasattr(enc, "down") else 1


def size_multiple(model) -> int:
    """Image sides must be multiples of this: the first stage's factor times the UNet's total downsampling."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    mult = getattr(unet, "channel_mult", None)
    return first_stage_factor(model) * (2 ** (len(mult) - 1) if mult is not None else 1)


def load_image(path: Union[str, Path]) -> torch.Tensor:
    """An image file as (1, 3, H, W) in [-1, 1], read by `ldm.files.read_image` (16-bit, gray, palette, EXIF)."""
    return torch.from_numpy(read_image(path) * 2.0 - 1.0).permute(2, 0, 1)[None]


def add_model_arguments(parser, default_ckpt: Optional[str] = None, default_config: Optional[str] = None) -> None:
    """The model flags of the task scripts: --config, --ckpt, --no-ema, --unsafe-load, --device, --precision, --dtype."""
    hint = f", or {default_config} for the default checkpoint" if default_config else ""
    parser.add_argument("--config", type=str, default=None, help=f"default: the run's configs/*-project.yaml{hint}")
    parser.add_argument("--ckpt", type=str, default=default_ckpt, required=default_ckpt is None)
    parser.add_argument("--no-ema", action="store_true", help="sample with the training weights, not the EMA ones")
    parser.add_argument("--unsafe-load", action="store_true", help="allow pickled objects in the checkpoint")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_precision_arguments(parser)


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
    return load_for_sampling(opt.ckpt, config, allow_pickle=opt.unsafe_load, device=opt.device,
                             dtype=getattr(opt, "dtype", None), kind=ModelKind.DIFFUSION)


def find_run_config(ckpt: Union[str, Path], run: Optional[Union[str, Path]] = None) -> Path:
    """The newest `configs/*-project.yaml` of the run directory `run`, by default the one holding `ckpt`
    (logs/<run>/checkpoints/x.ckpt)."""
    run = Path(run) if run is not None else Path(ckpt).resolve().parent.parent
    found = sorted(glob.glob(str(run / "configs" / "*-project.yaml")))
    if not found:
        raise ConfigError(f"no --config given and no configs/*-project.yaml in the run directory {run}")
    return Path(found[-1])


def latest_run(logdir: Union[str, Path], name: str) -> Path:
    """Newest `logs/<timestamp>_<name>` directory with a checkpoints/last.ckpt."""
    runs = [Path(p) for p in sorted(glob.glob(str(Path(logdir) / f"*_{name}"))) if (Path(p) / "checkpoints/last.ckpt").is_file()]
    if not runs:
        raise FileNotFoundError(f"no finished run named '*_{name}' with checkpoints/last.ckpt under {logdir}")
    return runs[-1]


def resolve_resume(resume: Union[str, Path]) -> tuple[Path, Path, Path]:
    """(checkpoint, config, log dir) for CompVis' `-r/--resume`: a checkpoint file or a log directory.

    A directory holds `model.ckpt` + `config.yaml` (the CompVis model zoo) or `checkpoints/last.ckpt` +
    `configs/*-project.yaml` (a run of main.py); a file takes the config next to it or of its run.
    """
    path = Path(resume)
    if path.is_file():
        ckpt = path
        logdir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    elif path.is_dir():
        logdir = path
        candidates = [path / "model.ckpt", path / "checkpoints" / "last.ckpt"]
        ckpt = next((c for c in candidates if c.is_file()), None)
        if ckpt is None:
            raise FileNotFoundError(f"-r {path}: no checkpoint in it (looked for {candidates[0]} and {candidates[1]})")
    else:
        raise FileNotFoundError(f"-r {path}: no such checkpoint file or log directory")
    for cfg in (ckpt.parent / "config.yaml", logdir / "config.yaml"):
        if cfg.is_file():
            return ckpt, cfg, logdir
    try:
        return ckpt, find_run_config(ckpt, run=logdir), logdir
    except ConfigError:
        raise ConfigError(f"-r {path}: no config next to the checkpoint (looked for {logdir / 'config.yaml'} and "
                          f"{logdir / 'configs'}/*-project.yaml); pass --config") from None


def load_for_sampling(ckpt: Union[str, Path], config: Optional[Union[str, Path]] = None, *, allow_pickle: bool = False,
                      device: Optional[str] = None, overrides: Sequence[str] = (),
                      dtype: Optional[Union[WeightsDType, str, torch.dtype]] = None,
                      kind: Optional[ModelKind] = None) -> tuple[torch.nn.Module, DictConfig]:
    """Model from a run checkpoint; sub-model `ckpt_path`s are dropped (the checkpoint holds all weights).

    `overrides`: dot-list `key=value` settings merged over the config (as CompVis' scripts take them).
    `dtype`: the networks' weights dtype (fp32, bf16, fp16, or auto: the checkpoint's); None keeps float32.
    `kind`: refuse, before anything is built, a config whose model is of another kind (e.g. an autoencoder run
    given to a text-to-image script).
    """
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {ckpt}")
    config = config if config is not None else find_run_config(ckpt)
    cfg = load_config(config)
    if kind is not None:
        if "model" not in cfg or "target" not in cfg.model:
            raise ConfigError(f"{config}: no model.target to build")
        require_kind(get_obj_from_str(cfg.model.target, key="model.target"), kind,
                     f"the checkpoint {ckpt} (config {config})")
    if overrides:
        bad = [o for o in overrides if "=" not in o or o.startswith("-")]
        if bad:
            raise ConfigError(f"unrecognized arguments: {' '.join(bad)} (config overrides are key=value)")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    for key in ("first_stage_config", "cond_stage_config", "unet_config"):
        sub = OmegaConf.select(cfg, f"model.params.{key}.params")
        if sub is not None and "ckpt_path" in sub.keys():
            sub.ckpt_path = None
    model = load_model_from_config(cfg, ckpt, allow_pickle=allow_pickle, device=device or default_device(), dtype=dtype)
    return model, cfg


def file_hash(path: Union[str, Path], n: int = 10) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return x


def save_png(array: np.ndarray, path: Union[str, Path], meta: dict) -> None:
    """Write a uint8 (H, W, C) array as a PNG with `meta` as text chunks, atomically (no half file on interruption)."""
    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(str(k), str(v))
    with atomic_path(path) as tmp:
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(tmp, format="PNG", pnginfo=info)


@torch.no_grad()
def sample_prompts(model, prompts: Sequence[str], *, steps: int, sampler: str, scale: float,
                   seed: Union[int, Sequence[int]], eta: float = 0.0, use_ema: bool = True,
                   precision: Union[Precision, str] = Precision.FP32, shape: Optional[Sequence[int]] = None,
                   x_T: Optional[torch.Tensor] = None, spacing: str = "uniform") -> torch.Tensor:
    """Decoded images (B, C, H, W) in [-1, 1] for `prompts`, one per prompt, with guidance `scale`.

    `seed`: an int seeds one generator for the batch; a list seeds one per image. `shape`: the latent
    (C, h, w) (default the model's native size); `x_T`: a start code instead of one drawn from the seeds.
    """
    g = generators(seed, model.device)
    kw = eta_option(sampler, eta)
    ctx = model.ema_scope("sampling") if use_ema else contextlib.nullcontext()
    with ctx, precision_scope(precision, model.device):
        c = model.get_learned_conditioning(list(prompts))
        uc = model.get_learned_conditioning([""] * len(prompts)) if scale != 1.0 else None
        z = model.sample(c, len(prompts), steps=steps, sampler=sampler, guidance_scale=scale, uncond=uc, generator=g,
                         shape=shape, x_T=x_T, spacing=spacing, **kw)
        return model.decode_first_stage(z.float()).float()


def uses_text(model) -> bool:
    """Whether the model reads text (cross-attention)."""
    return model.model.conditioning_key in ("crossattn", "hybrid", "hybrid-adm")


def image_conditioning(model, image: torch.Tensor, prompts: Sequence[str], scale: float, noise_level: int = 20):
    """(cond, uncond) for sampling `model` on `image` (B, C, H, W in [-1, 1]) without a mask or a separate input:
    text models get the prompts; an inpainting model a mask over everything (nothing known); a super-resolution
    model the image downscaled by its factor (and an x4 upscaler that image at `noise_level`)."""
    import torch.nn.functional as F

    from ldm.inpainting import InpaintMode, inpaint_mode
    from ldm.models.diffusion.upscale import LatentUpscaleDiffusion

    n = image.shape[0]
    c = model.get_learned_conditioning(list(prompts)) if uses_text(model) else None
    uc = model.get_learned_conditioning([""] * n) if uses_text(model) and scale != 1.0 else None
    mode = inpaint_mode(model)
    if mode is not InpaintMode.REPLACE:  # inpainting models: everything is to be filled
        from ldm.inpainting import inpainting_conditioning
        return inpainting_conditioning(model, image, torch.ones_like(image[:, :1]), c, uc, mode)
    f = first_stage_factor(model)
    if isinstance(model, LatentUpscaleDiffusion):
        zx, level = model.low_scale_conditioning(F.interpolate(image, scale_factor=1 / f, mode="area"),
                                                 torch.full((n,), noise_level, device=image.device))
        cond = model._conds(c, zx, level)
        return cond, ({**cond, "c_crossattn": [uc]} if uc is not None else None)
    if model.model.conditioning_key == "concat" and getattr(model, "cond_stage_key", None) in ("LR_image", "lr"):
        return model.get_learned_conditioning(F.interpolate(image, scale_factor=1 / f, mode="area")), None
    return c, uc


@torch.no_grad()
def img2img(model, image: torch.Tensor, prompts: Sequence[str], *, strength: float, steps: int, sampler: str,
            scale: float, seed: Union[int, Sequence[int]], use_ema: bool = True,
            precision: Union[Precision, str] = Precision.FP32, eta: float = 0.0,
            spacing: str = "uniform") -> torch.Tensor:
    """SDEdit (Meng et al. 2022): encode `image` (B, C, H, W in [-1, 1]), noise it to `strength`, denoise with guidance."""
    g = generators(seed, model.device)
    kw = eta_option(sampler, eta)
    ctx = model.ema_scope("img2img") if use_ema else contextlib.nullcontext()
    with ctx, precision_scope(precision, model.device):
        image = image.to(model.device)
        z0 = model.encode_latents(image)  # the posterior's mode for KL, the codes for VQ
        c, uc = image_conditioning(model, image, prompts, scale)
        den = model.denoiser()
        sigmas = get_sigmas(den.schedule, steps, spacing).to(model.device)
        x, sig = img2img_start(z0, sigmas, strength, randn_like(z0, g))
        extra = {"cond": {"c": c}} | ({"uncond": {"c": uc}} if uc is not None else {})
        z = sample(CFGDenoiser(den, scale=scale), x, sig, sampler, generator=g, extra_args=extra, **kw)
        return model.decode_first_stage(z.float()).float()
