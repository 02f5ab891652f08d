"""Generation in one place: from a model kind's conditioning to decoded images.

Every task runs the same named steps (diffusers' pipelines; sgm's `DiffusionEngine`):
1. check and condition: `model.conditioning(prompts=..., image=..., mask=..., ...)` -> `Conditioning`
   (each model kind answers for itself: what it reads, which keys guidance nulls);
2. prepare latents: start noise from the per-image generators, or an image encoded under one `Encoding`
   policy and noised to `strength` (img2img), or held in its known region (inpainting);
3. the loop: denoiser -> classifier-free guidance (scale, rescale) -> known-region / RePaint wrapper ->
   sigmas (any spacing) -> the registry sampler;
4. decode, with one dtype policy: latents leave the sampler as float32 and the first stage's output is
   returned as float32 images (nominally [-1, 1]), whatever the weights' dtype or the autocast around.

`generate` does 2-4. `DDPM.sample`, text-to-image, img2img, inpainting, super-resolution tiles, the
evaluator, the notebooks and the DDIM / PLMS shells' `decode` all call it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from ldm.errors import InputError
from ldm.modules.model_inputs import ConditionInput, Encoding, latent_known_region
from ldm.precision import Precision, precision_scope
from ldm.sampling import (CFGDenoiser, CompVisDenoiser, Conditioning, Spacing, ThresholdedDenoiser, ThresholdMode,
                          get_sigmas, img2img_start, inpaint_sample, randn_like, sample)
from ldm.sampling.registry import eta_option
from ldm.sampling.samplers import Generator

Seed = Union[int, Sequence[int]]


# -- seeds ------------------------------------------------------------------------------------------------
def generators(seed: Seed, device: Union[str, torch.device]) -> Generator:
    """One generator for an int seed; one per image for a list (each image then reproduces from its own seed)."""
    if isinstance(seed, int):
        return torch.Generator(device=device).manual_seed(seed)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]


def image_seeds(seed: int, first: int, n: int) -> list[int]:
    """Per-image seeds: image k of a run uses seed + k, whatever the batch split (n_samples x n_iter)."""
    return [seed + k for k in range(first, first + n)]


def start_noise(n: int, shape: Sequence[int], device: Union[str, torch.device], generator: Generator = None
                ) -> torch.Tensor:
    """A start code (n, *shape) drawn as the samplers draw noise (image i from generator i when a list is given)."""
    return randn_like(torch.empty((n, *shape), device=device), generator)


# -- sizes ------------------------------------------------------------------------------------------------
def first_stage_factor(model) -> int:
    """The first stage's downsampling factor f (image side / latent side), as the first stage states it; 1 for a
    pixel-space model (no first stage)."""
    first = getattr(model, "first_stage_model", None)
    if first is None:
        return 1
    if not hasattr(first, "downsampling_factor"):
        raise InputError(f"first stage {type(first).__name__} does not state its downsampling_factor (image side / "
                         f"latent side); give the class that property")
    return int(first.downsampling_factor)


def size_multiple(model) -> int:
    """Image sides must be multiples of this: the first stage's factor times the UNet's total downsampling."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    mult = getattr(unet, "channel_mult", None)
    return first_stage_factor(model) * (2 ** (len(mult) - 1) if mult is not None else 1)


def needs_unconditional(model, scale: float) -> bool:
    """Whether sampling `model` at guidance `scale` needs the unconditional branch: guided (scale != 1), by a model
    that does not take the scale as an input (a guidance-distilled student needs none)."""
    return scale != 1.0 and not guidance_as_input(model)


def check_rescale(model, rescale: float) -> None:
    """Refuse guidance rescale for a model that takes the guidance scale as an input (it gives only the guided output,
    and rescale needs the conditional one apart)."""
    if rescale and guidance_as_input(model):
        raise ValueError("guidance rescale needs the conditional and the guided outputs apart; this model takes the "
                         "guidance scale as an input and gives only the guided one")


def guidance_setup(model, den, conditioning: Conditioning, scale: float, n: int, device: torch.device,
                   rescale: float = 0.0) -> tuple[CFGDenoiser, dict]:
    """The guided denoiser and its `extra_args`: batched classifier-free guidance at `scale`, or, for a model that
    takes the scale as an input, one forward per step with the scale given to each of the n images."""
    check_rescale(model, rescale)
    as_input = guidance_as_input(model)
    guided = CFGDenoiser(den, scale=1.0 if as_input else scale, rescale=rescale)
    extra = conditioning.extra_args(1.0 if as_input else scale)
    if as_input:  # the scale as the network's input, one per image
        extra["cond"]["guidance"] = torch.full((n,), float(scale), device=device)
    return guided, extra


def guidance_as_input(model) -> bool:
    """Whether `model` takes the guidance scale as a network input (one forward per step, no unconditional branch)."""
    return bool(getattr(model, "takes_guidance", False))


def reads(model, what: ConditionInput) -> bool:
    """Whether `model.conditioning()` reads `what` (prompts, labels, a mask...)."""
    return what in getattr(model, "condition_inputs", frozenset())


# -- scope, encode, decode --------------------------------------------------------------------------------
@contextlib.contextmanager
def sampling_scope(model, use_ema: bool = True, precision: Union[Precision, str] = Precision.FP32,
                   context: str = "sampling") -> Iterator[None]:
    """The EMA weights (when the model keeps them and `use_ema`) and the autocast of `precision`, for one task."""
    ema = model.ema_scope(context) if use_ema and getattr(model, "use_ema", False) else contextlib.nullcontext()
    with ema, precision_scope(precision, model.device):
        yield


def encode_image(model, image: torch.Tensor, encoding: Encoding = Encoding.MODE) -> torch.Tensor:
    """Scaled latents of images (B, C, H, W in [-1, 1]) under `encoding`; a pixel-space model's latents are the image."""
    if not hasattr(model, "encode_latents"):
        return image.float()
    return model.encode_latents(image, encoding)


def decode_latents(model, z: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in float32 from latents: the first stage decodes float32 latents (it casts them to its
    own weights' dtype); a pixel-space model's samples are the images."""
    if not hasattr(model, "decode_first_stage"):
        return z.float()
    return model.decode_first_stage(z.float()).float()


# -- the recipe -------------------------------------------------------------------------------------------
def model_device(model) -> torch.device:
    """Where `model` lives: its `device` (Lightning modules), else its first parameter's or buffer's."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _batch_size(n: Optional[int], conditioning: Conditioning, *tensors: Optional[torch.Tensor]) -> int:
    if n is not None:
        return int(n)
    for t in tensors:
        if t is not None:
            return int(t.shape[0])
    size = conditioning.batch_size
    if size is None:
        raise ValueError("generate: give the number of images n (the conditioning does not fix it)")
    return size


def _sample_shape(model, shape: Optional[Sequence[int]], conditioning: Conditioning,
                  z0: Optional[torch.Tensor]) -> tuple[int, ...]:
    if shape is not None:
        return tuple(shape)
    if z0 is not None:
        return tuple(z0.shape[1:])
    size = conditioning.latent_size
    if size is not None:
        return (model.channels, *size)
    native = getattr(model, "native_sample_shape", None)  # a video model: (C, frames, H, W)
    return tuple(native) if native is not None else (model.channels, model.image_size, model.image_size)


@torch.no_grad()
def generate(model, conditioning: Optional[Conditioning] = None, n: Optional[int] = None, *,
             steps: Optional[int] = None, sampler: Optional[str] = None, scale: Optional[float] = None,
             rescale: float = 0.0, spacing: Optional[Union[Spacing, str]] = None,
             sigmas: Optional[torch.Tensor] = None, generator: Generator = None, x_T: Optional[torch.Tensor] = None,
             shape: Optional[Sequence[int]] = None, image: Optional[torch.Tensor] = None,
             strength: Optional[float] = None, mask: Optional[torch.Tensor] = None,
             encoding: Encoding = Encoding.MODE, jump_length: int = 1, jump_n_sample: int = 1,
             quantize: bool = False, threshold: Optional[bool] = None, callback: Optional[Callable] = None,
             decode: bool = True, **sampler_options) -> torch.Tensor:
    """Images (float32, nominally [-1, 1], not clamped) or, with `decode=False`, VP latents, sampled from `model`
    under `conditioning`.

    Noise levels: `sigmas` as given, else `steps` (default the model's `sample_steps`) spread by `spacing`.
    Start: `x_T`, else noise of `shape` (default: the concatenated inputs' size, else the model's native
    size) drawn from `generator` (one, or one per image). With `image`: its latents (`encoding`) are
    noised to `strength` (SDEdit img2img), or with `mask` (1 = fill) held in the known region at every
    step (known-region replacement; RePaint resampling with `jump_n_sample` > 1). Guidance: `scale`
    (default the model's `guidance_scale`) with `rescale` (Lin et al. 2023). `threshold`: clip the x0
    estimate to [-1, 1] (default the model's `clip_denoised`, on for pixel-space DDPMs). `quantize`:
    integer timesteps (the CompVis shells). `spacing` defaults to the model's `sample_spacing`. A model that takes
    the guidance scale as an input (a guidance-distilled student) is given `scale` and evaluated once per step.
    """
    conditioning = conditioning if conditioning is not None else Conditioning()
    device = model_device(model)  # a CompVis-like model (the DDIM / PLMS shells') has only what they read
    sampler = sampler or getattr(model, "sampler_name", "ddim")
    scale = getattr(model, "guidance_scale", 1.0) if scale is None else scale
    spacing = spacing or getattr(model, "sample_spacing", Spacing.UNIFORM)
    den = model.denoiser(quantize=quantize) if hasattr(model, "denoiser") else CompVisDenoiser(model, quantize=quantize)
    if sigmas is None:
        steps = steps or getattr(model, "sample_steps", None)
        if not steps:
            raise ValueError("generate: give the number of steps (or sigmas)")
        sigmas = get_sigmas(den.schedule, steps, spacing)
    sigmas = sigmas.to(device)
    check_rescale(model, rescale)  # refused before any work
    z0 = None
    if image is not None and (strength is not None or mask is not None):
        z0 = encode_image(model, image.to(device), encoding)
    if z0 is not None and strength is not None:
        x, sigmas = img2img_start(z0, sigmas, strength, randn_like(z0, generator))
    elif x_T is not None:
        x = x_T.to(device)
    else:
        x = start_noise(_batch_size(n, conditioning, z0), _sample_shape(model, shape, conditioning, z0), device,
                        generator)
    guided, extra = guidance_setup(model, den, conditioning, scale, x.shape[0], device, rescale)
    if getattr(model, "clip_denoised", False) if threshold is None else threshold:
        guided = ThresholdedDenoiser(guided, mode=ThresholdMode.STATIC)  # pixel space: x0 within the data range
    if mask is not None:
        if z0 is None:
            raise ValueError("generate: a mask needs the image whose unmasked region it keeps")
        known = latent_known_region(mask.to(device), z0.shape[-2:])
        z = inpaint_sample(guided, x, sigmas, known, z0, sampler, generator=generator, extra_args=extra,
                           callback=callback, jump_length=jump_length, jump_n_sample=jump_n_sample, **sampler_options)
    else:
        z = sample(guided, x, sigmas, sampler, generator=generator, extra_args=extra, callback=callback,
                   **sampler_options)
    return decode_latents(model, z) if decode else z


# -- the two tasks that are the recipe itself ---------------------------------------------------------------
@torch.no_grad()
def sample_prompts(model, prompts: Sequence[str], *, steps: int, sampler: str, scale: float, seed: Seed,
                   eta: float = 0.0, use_ema: bool = True, precision: Union[Precision, str] = Precision.FP32,
                   shape: Optional[Sequence[int]] = None, x_T: Optional[torch.Tensor] = None,
                   spacing: Optional[Union[Spacing, str]] = None, rescale: float = 0.0) -> torch.Tensor:
    """Text-to-image: decoded images (B, C, H, W) in [-1, 1] for `prompts`, one per prompt, with guidance `scale`.

    `seed`: an int seeds one generator for the batch; a list seeds one per image. `shape`: the latent
    (C, h, w) (default the model's native size); `x_T`: a start code instead of one drawn from the seeds.
    """
    g = generators(seed, model.device)
    options = eta_option(sampler, eta)
    with sampling_scope(model, use_ema, precision):
        cond = model.conditioning(prompts=list(prompts), guidance=needs_unconditional(model, scale))
        return generate(model, cond, len(prompts), steps=steps, sampler=sampler, scale=scale, rescale=rescale,
                        spacing=spacing, generator=g, shape=shape, x_T=x_T, **options)


@torch.no_grad()
def img2img(model, image: torch.Tensor, prompts: Optional[Sequence[str]] = None, *, strength: float, steps: int,
            sampler: str, scale: float, seed: Seed, use_ema: bool = True,
            precision: Union[Precision, str] = Precision.FP32, eta: float = 0.0,
            spacing: Optional[Union[Spacing, str]] = None, rescale: float = 0.0,
            noise_level: Optional[int] = None) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): encode `image` (B, C, H, W in [-1, 1]), noise it to `strength`, denoise with
    guidance. The model is conditioned on what it reads: the prompts, the image itself for an inpainting model
    (nothing known) or, downscaled, for a super-resolution model (an x4 upscaler at `noise_level`)."""
    g = generators(seed, model.device)
    options = eta_option(sampler, eta)
    image = image.to(model.device)
    with sampling_scope(model, use_ema, precision, "img2img"):
        cond = model.conditioning(prompts=None if prompts is None else list(prompts), image=image,
                                  noise_level=noise_level, guidance=needs_unconditional(model, scale))
        return generate(model, cond, image.shape[0], image=image, strength=strength, steps=steps, sampler=sampler,
                        scale=scale, rescale=rescale, spacing=spacing, generator=g, **options)
