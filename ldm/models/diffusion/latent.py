"""LatentDiffusion (Rombach et al. 2022): DDPM on the latents of a frozen first stage, with a conditioner."""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ldm import generation
from ldm.errors import InputError
from ldm.generation import first_stage_factor
from ldm.models.diffusion.diffusion_module import DDPM, ConditioningKey, disabled_train
from ldm.modules.diffusionmodules.batch_random import GlobalBatchRandom, posterior_sample
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.conditioner import (EmbedderRole, Feed, GeneralConditioner, Null, drop_conditions,
                                              null_input_like)
from ldm.modules.model_inputs import (LATENT_KEY, ConditionInput, ConditionValues, Encoding, InpaintMode,
                                      MaskConvention, masked_inputs, resize_mask, unscaled_latents)
from ldm.sampling import Conditioning
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)


# condition keys passed through as they are (CompVis `get_input`): text, boxes and class labels
UNPERMUTED_COND_KEYS = ("caption", "txt", "coordinates_bbox", "class_label", "cls")
# cond_stage_key of the paper's super-resolution LDMs (the low-resolution image concatenated to the latent)
LOW_RES_KEYS = ("LR_image", "lr")
# cond_stage_key of the paper's inpainting LDM (CompVis inpainting_big: masked-image latent + mask, concatenated)
MASKED_IMAGE_KEY = "masked_image"
# cond_stage_keys of cross-attention models whose conditioner does not read text (layouts, images)
NON_TEXT_KEYS = ("coordinates_bbox", "image", "segmentation")


def compvis_role(cond_stage_key: str, key: Optional[ConditioningKey], cond_stage_model: Optional[nn.Module],
                first_stage_model: nn.Module, trainable: bool, ucg_rate: float) -> Optional[EmbedderRole]:
    """The embedder role the CompVis keys describe (`cond_stage_key`, `conditioning_key`, the conditioner), or None
    for an unconditional model: the one place where a CompVis config's strings say what a model is conditioned on."""
    if key is None or cond_stage_model is None:
        return None
    if key is ConditioningKey.CONCAT and cond_stage_key == MASKED_IMAGE_KEY and cond_stage_model is first_stage_model:
        reads = ConditionInput.MASK
    elif key is ConditioningKey.CONCAT and cond_stage_key in LOW_RES_KEYS:
        reads = ConditionInput.LOW_RES
    elif getattr(cond_stage_model, "n_classes", None) is not None:
        reads = ConditionInput.LABELS
    elif key.reads_text and cond_stage_key not in NON_TEXT_KEYS:
        reads = ConditionInput.PROMPTS
    else:
        reads = ConditionInput.RAW
    feed = {ConditioningKey.CONCAT: Feed.CONCAT, ConditioningKey.ADM: Feed.VECTOR}.get(key, Feed.CROSSATTN)
    return EmbedderRole(input_keys=(cond_stage_key,), trainable=trainable, ucg_rate=ucg_rate, null=Null.NULL_INPUT,
                        feeds=(feed,), reads=reads,
                        guided=reads in (ConditionInput.PROMPTS, ConditionInput.LABELS))


def learned_conditioning(cond_stage_model: nn.Module, c: Any, forward_name: Optional[str] = None) -> Any:
    """A CompVis conditioner's output for `c`: `cond_stage_forward` when named, else `encode` (a KL posterior's
    mode), else the module called."""
    if forward_name is not None:
        return getattr(cond_stage_model, forward_name)(c)
    if hasattr(cond_stage_model, "encode") and callable(cond_stage_model.encode):
        c = cond_stage_model.encode(c)
        return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
    return cond_stage_model(c)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class LatentDiffusion(DDPM):
    """The LDM: `first_stage_model` (frozen AE), `cond_stage_model` (conditioner), `model` (UNet wrapper)."""

    def __init__(self, first_stage_config, cond_stage_config=None, num_timesteps_cond: Optional[int] = None,
                 cond_stage_key: str = "image", cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: Optional[str] = None, conditioning_key: Optional[str] = None,
                 scale_factor: float = 1.0, scale_by_std: bool = False, conditioner_config=None,
                 *args: Any, **kwargs: Any):
        """The conditioning: CompVis' `cond_stage_config` (with `cond_stage_key`, `conditioning_key`) or sgm's
        `conditioner_config` (a GeneralConditioner of `emb_models`, each with its input key and drop rate)."""
        self.num_timesteps_cond = num_timesteps_cond or 1
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError("num_timesteps_cond must not exceed timesteps")
        if self.num_timesteps_cond > 1:  # CompVis' shortened conditioning schedule; no published config uses it
            raise ValueError(f"num_timesteps_cond={self.num_timesteps_cond}: noising the conditioning on a shortened "
                             f"schedule is not implemented here; use 1 (every published config does)")
        if conditioner_config is not None:
            if cond_stage_config not in (None, "__is_unconditional__"):
                raise ConfigError("model.params: give cond_stage_config (CompVis) or conditioner_config (sgm), "
                                  "not both")
            if conditioning_key not in (None, ConditioningKey.ROUTED.value):
                raise ConfigError(f"model.params.conditioning_key '{conditioning_key}': a conditioner_config "
                                  f"routes each embedder by what it feeds; leave conditioning_key unset")
            if kwargs.get("ucg_rate", 0.0):
                raise ConfigError("model.params.ucg_rate: with a conditioner_config each embedder has its own "
                                  "ucg_rate (conditioner_config.params.emb_models[i].ucg_rate)")
            conditioning_key = ConditioningKey.ROUTED.value
        elif conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if conditioner_config is None and cond_stage_config in ("__is_unconditional__", None):
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode, self.cond_stage_trainable, self.cond_stage_key = concat_mode, cond_stage_trainable, cond_stage_key
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        self.cond_stage_forward = cond_stage_forward
        if conditioner_config is not None:
            self.cond_stage_model = None
            self.conditioner = self.instantiate_conditioner(conditioner_config)
        else:
            self.instantiate_cond_stage(cond_stage_config)
            self.conditioner = GeneralConditioner()  # borrows cond_stage_model (its parameters keep their names)
            role = compvis_role(cond_stage_key, self.model.conditioning_key, self.cond_stage_model,
                                self.first_stage_model, cond_stage_trainable, self.ucg_rate)
            if role is not None:
                self.conditioner.add(self.cond_stage_model, role, own=False,
                                     encode=partial(learned_conditioning, self.cond_stage_model,
                                                    forward_name=cond_stage_forward))
        self.clip_denoised = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    # -- parts ------------------------------------------------------------------------------------
    def instantiate_first_stage(self, config) -> None:
        model = instantiate_from_config(config, key="model.params.first_stage_config")
        self.first_stage_model = model.eval()
        self.first_stage_model.train = disabled_train
        for p in self.first_stage_model.parameters():
            p.requires_grad = False

    def instantiate_cond_stage(self, config) -> None:
        if config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
            return
        if config == "__is_unconditional__" or config is None:
            self.cond_stage_model = None
            return
        model = instantiate_from_config(config, key="model.params.cond_stage_config")
        if not self.cond_stage_trainable:
            model = model.eval()
            model.train = disabled_train
            for p in model.parameters():
                p.requires_grad = False
        self.cond_stage_model = model

    @staticmethod
    def instantiate_conditioner(config) -> GeneralConditioner:
        conditioner = instantiate_from_config(config, key="model.params.conditioner_config")
        if not isinstance(conditioner, GeneralConditioner):
            raise ConfigError(f"model.params.conditioner_config: target {config.get('target')} built a "
                              f"{type(conditioner).__name__}, not a GeneralConditioner")
        return conditioner

    @property
    def routed(self) -> bool:
        """Whether the conditioning is sgm's embedder list (`conditioner_config`) rather than CompVis' one conditioner."""
        return self.model.conditioning_key is ConditioningKey.ROUTED

    def networks(self) -> list[torch.nn.Module]:
        """UNet (and EMA copy), first stage and conditioner(s): what `set_weights_dtype` casts."""
        parts = super().networks() + [self.first_stage_model]
        if self.cond_stage_model is not None and self.cond_stage_model is not self.first_stage_model:
            parts.append(self.cond_stage_model)
        return parts + self.conditioner.modules_owned()

    def trainable_parameters(self) -> list:
        params = super().trainable_parameters()
        if self.routed:
            return params + self.conditioner.trainable_parameters()
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            params += list(self.cond_stage_model.parameters())
        return params

    # -- first stage ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior) -> torch.Tensor:
        """A posterior sample (not its mode) times scale_factor, as trained in CompVis."""
        return self.scale_factor * self._sampled_latents(encoder_posterior, self.batch_random)

    @staticmethod
    def _sampled_latents(encoder_posterior, rng) -> torch.Tensor:
        """Unscaled latents, a KL posterior sampled with `rng`'s draw for the global batch when given (noise_seed)."""
        if rng is not None and isinstance(encoder_posterior, DiagonalGaussianDistribution):
            return posterior_sample(encoder_posterior, rng)
        return unscaled_latents(encoder_posterior, Encoding.SAMPLE)

    def encode_latents(self, x: torch.Tensor, encoding: Encoding = Encoding.MODE) -> torch.Tensor:
        """Scaled latents of images `x` (B, C, H, W in [-1, 1]) for any first stage (KL, VQ, identity)."""
        return self.scale_factor * unscaled_latents(self.encode_first_stage(x), encoding)

    def _posterior_from_cache(self, moments: torch.Tensor):
        """A cached encoding as the first stage returns it: a KL posterior from its moments, else the tensor."""
        moments = moments.to(self.device).float()
        from ldm.models.autoencoder import AutoencoderKL

        if isinstance(self.first_stage_model, AutoencoderKL):
            return DiagonalGaussianDistribution(moments)
        return moments

    @torch.no_grad()
    def encode_batch(self, batch: dict, k: str, bs: Optional[int] = None):
        """The first stage's output for `batch`: from cached latents (ldm.data.latents) when present, else encoded."""
        if LATENT_KEY in batch:
            moments = batch[LATENT_KEY][:bs] if bs is not None else batch[LATENT_KEY]
            return self._posterior_from_cache(moments)
        x = super().get_input(batch, k).to(self.device)
        return self.encode_first_stage(x[:bs] if bs is not None else x)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    @torch.no_grad()
    def on_train_batch_start(self, batch, batch_idx) -> None:
        """scale_by_std: 1 / std of the first batch's latents, pooled over all DDP ranks, stored as a buffer."""
        if not (self.scale_by_std and self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
                and not self.restarted_from_ckpt):
            return
        # measured on the first stage's own latents (a configured factor is replaced, not multiplied), in float32
        # whatever autocast surrounds the hook
        with torch.autocast(self.device.type, enabled=False):
            z = self._sampled_latents(self.encode_batch(batch, self.first_stage_key),
                                      self.global_batch_random(stream=1)).detach().double().flatten()
        stats = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), device=z.device, dtype=z.dtype)])
        s, s2, n = _all_reduce_sum(stats).tolist()
        var = (s2 - s * s / n) / (n - 1)
        configured = float(self.scale_factor)
        self.scale_factor.copy_(torch.tensor(1.0 / var ** 0.5, dtype=self.scale_factor.dtype))
        logger.info("scale_by_std: setting scale_factor to %.6f (1 / std of %d unscaled latent values)%s",
                    float(self.scale_factor), int(n),
                    f"; replaces the configured {configured:g}" if configured != 1.0 else "")

    # -- conditioning -----------------------------------------------------------------------------
    def get_learned_conditioning(self, c: Any) -> Any:
        """The conditioner's output for the raw condition `c` (for a conditioner_config: a batch mapping, and the
        UNet's conditioning keywords come back)."""
        if self.routed:
            if not isinstance(c, dict):
                raise InputError(f"this model's conditioner (conditioner_config) embeds a batch: a mapping of its "
                                 f"input keys {sorted({k for r in self.conditioner.roles for k in r.input_keys})}, "
                                 f"not a {type(c).__name__}")
            return self.conditioner(c)
        return learned_conditioning(self.cond_stage_model, c, self.cond_stage_forward)

    def null_condition(self, c: Any) -> Any:
        """The raw "no condition" of the same kind: empty strings, the null class, zeros."""
        return null_input_like(c, self.cond_stage_key, getattr(self.cond_stage_model, "null_label", None))

    def drop_condition(self, c: Any, p: float) -> Any:
        """Classifier-free guidance training: replace each item's condition by the null one with probability p."""
        return drop_conditions(c, p, self.null_condition(c), self.batch_random) if p > 0 else c

    def get_unconditional_conditioning(self, c_raw: Any) -> Any:
        if self.routed:
            return self.conditioner.with_unconditional(c_raw)[1]
        return self.get_learned_conditioning(self.null_condition(c_raw))

    @property
    def guided_keys(self) -> tuple[str, ...]:
        """Keys of a dict conditioning that classifier-free guidance may replace by their null form (the rest is
        shared): the cross-attention context, and for an embedder list whatever its guided embedders feed."""
        if self.routed:
            return tuple(f.unet_key for f in Feed)
        return ("c_crossattn",)

    def unconditional_like(self, c: Any, c_raw: Any) -> Any:
        """The guidance's unconditional input matching the conditioning `c` (of the raw condition `c_raw`): its
        guided keys nulled, the rest (mask, low-resolution image, noise level) shared."""
        if self.routed:
            return self.get_unconditional_conditioning(c_raw)
        if not isinstance(c, dict):
            return self.get_unconditional_conditioning(c_raw)
        guided = [k for k in self.guided_keys if k in c]
        if not guided:
            return c
        null = self.get_unconditional_conditioning(c_raw)
        return {**c, **{k: [null] for k in guided}}

    # -- conditioning for sampling: the model kind answers what it reads and how -----------------------
    @property
    def condition_inputs(self) -> frozenset[ConditionInput]:
        """What `conditioning()` needs: what the embedders read (prompts, class labels, a low-resolution image, an
        image and mask, or raw values); nothing for an unconditional model."""
        return self.conditioner.condition_inputs

    @property
    def inpaint_mode(self) -> InpaintMode:
        """How this model inpaints: the paper's concat model reads image and mask, any other LDM by known-region
        replacement."""
        return InpaintMode.PAPER if ConditionInput.MASK in self.condition_inputs else InpaintMode.REPLACE

    def conditioning(self, *, prompts: Optional[Sequence[str]] = None, labels: Any = None,
                     image: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                     low_res: Optional[torch.Tensor] = None, noise_level: Any = None, raw: Any = None,
                     guidance: bool = True, generator: Any = None) -> Conditioning:
        """(cond, uncond) for sampling this model; it reads what `condition_inputs` names and ignores the rest.

        `image` (B, C, H, W in [-1, 1]) with `mask` (B, 1, H, W, 1 = fill; default: everything) for
        inpainting models; `low_res` (or `image`, downscaled by the first stage's factor) for
        super-resolution models; `raw`: a conditioner's input as it is (for an embedder list, a mapping of its
        batch keys); `guidance`: also build the unconditional branch (null prompts/labels).
        `generator`: the noise of an upscaler's augmentation (one, or one per image).
        """
        given = ConditionValues(prompts=prompts, labels=labels, image=image, mask=mask, low_res=low_res,
                                noise_level=noise_level, raw=raw, generator=generator)
        missing = sorted(x.value for x in self.condition_inputs if given.given(x) is None)
        if missing:
            what = (f"conditioner_config ({len(self.conditioner.entries)} embedders)" if self.routed
                    else f"cond_stage_key '{self.cond_stage_key}'")
            raise InputError(f"this {type(self).__name__} ({what}) is conditioned on "
                             f"{', '.join(sorted(x.value for x in self.condition_inputs))}: give {', '.join(missing)}"
                             + (" (the image to fill)" if "mask" in missing else ""))
        if low_res is None and image is not None and ConditionInput.LOW_RES in self.condition_inputs:
            f = first_stage_factor(self)
            given.low_res = torch.nn.functional.interpolate(image.float(), scale_factor=1 / f, mode="area")
        cond, null = self.condition_parts(given, guidance)
        return Conditioning.guided(cond or None, {k: v for k, v in null.items() if k in self.guided_keys})

    def guidance_pair(self, raw: Any, guidance: bool) -> tuple[Any, Any]:
        """(the learned condition of `raw` prompts or labels, its null twin when guiding, else None)."""
        c = self.get_learned_conditioning(raw)
        return c, (self.get_unconditional_conditioning(raw) if guidance else None)

    def condition_batch(self, given: ConditionValues) -> dict[str, Any]:
        """The batch an embedder list reads, from what `conditioning()` was given: each embedder's keys filled
        with the input it reads (prompts, labels, or `raw[key]`)."""
        batch: dict[str, Any] = {}
        for role in self.conditioner.roles:
            value = given.given(role.reads)
            for key in role.input_keys:
                if role.reads is ConditionInput.RAW and isinstance(value, dict):
                    if key not in value:
                        raise InputError(f"raw conditioning has no key '{key}' (an embedder's input_key); "
                                         f"keys: {sorted(value)}")
                    batch[key] = value[key]
                elif role.reads is ConditionInput.PROMPTS:
                    batch[key] = list(value)
                elif role.reads is ConditionInput.LABELS:
                    batch[key] = torch.as_tensor(value, device=self.device).long()
                elif role.reads is ConditionInput.RAW:
                    batch[key] = value
                else:
                    raise InputError(f"an embedder of conditioner_config reads '{role.reads.value}', which only "
                                     f"the CompVis model kinds supply")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def condition_parts(self, given: ConditionValues, guidance: bool) -> tuple[dict, dict]:
        """(the UNet's conditioning keys, their null forms for guidance) of this model kind's inputs."""
        needs = self.condition_inputs
        if not needs:
            return {}, {}
        if self.routed:
            cond, uncond = self.conditioner.with_unconditional(self.condition_batch(given), guidance)
            return cond, (uncond or {})
        key = self.model.conditioning_key.plain_key
        if ConditionInput.MASK in needs:  # the paper's inpainting model: no guidance (nothing to null)
            image = given.image
            mask_in, masked = masked_inputs(image, self._fill_all(image) if given.mask is None else given.mask,
                                            MaskConvention.COMPVIS)
            return {key: [self.with_mask(self.get_learned_conditioning(masked), mask_in)]}, {}
        if ConditionInput.LOW_RES in needs:
            return {key: [self.get_learned_conditioning(given.low_res)]}, {}
        if ConditionInput.RAW in needs:
            return {key: [self.get_learned_conditioning(given.raw)]}, {}
        if ConditionInput.PROMPTS in needs:
            c, uc = self.guidance_pair(list(given.prompts), guidance)
        else:
            c, uc = self.guidance_pair(torch.as_tensor(given.labels, device=self.device).long(), guidance)
        return {key: [c]}, ({key: [uc]} if uc is not None else {})

    @staticmethod
    def _fill_all(image: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(image[:, :1])

    @staticmethod
    def with_mask(c: torch.Tensor, mask_in: torch.Tensor) -> torch.Tensor:
        """The paper's inpainting input: the masked image's latent, then the mask at its size, on channels."""
        return torch.cat([c, resize_mask(mask_in.to(c.device), c.shape[-2:])], 1)

    def raw_condition(self, batch: dict, bs: Optional[int] = None) -> Any:
        """The condition of `batch` as the conditioner takes it (for an embedder list: its keys of the batch)."""
        if self.routed:
            keys = {k for role in self.conditioner.roles for k in role.input_keys}
            missing = sorted(keys - set(batch))
            if missing:
                raise KeyError(f"batch has no key {', '.join(map(repr, missing))} (input_key of an embedder of "
                               f"conditioner_config); keys: {sorted(batch)}")
            return {k: (batch[k].to(self.device) if isinstance(batch[k], torch.Tensor) else batch[k])[:bs]
                    for k in sorted(keys)}
        key = self.cond_stage_key
        if key not in batch:
            raise KeyError(f"batch has no key '{key}' (cond_stage_key); keys: {sorted(batch)}")
        xc = batch[key]
        if key not in UNPERMUTED_COND_KEYS and isinstance(xc, torch.Tensor) and xc.dim() in (3, 4):
            xc = super().get_input(batch, key)  # image-like (B, H, W[, C]) -> (B, C, H, W), as CompVis
        if isinstance(xc, torch.Tensor):
            xc = xc.to(self.device)
        if bs is not None:
            xc = xc[:bs]
        return xc

    @torch.no_grad()
    def batch_latents(self, batch: dict, k: str, bs: Optional[int] = None) -> torch.Tensor:
        """The scaled latents the diffusion model trains on for `batch[k]` (a video model encodes frame by frame)."""
        return self.get_first_stage_encoding(self.encode_batch(batch, k, bs)).detach()

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
                  cond_key: Optional[str] = None, return_original_cond: bool = False, bs: Optional[int] = None,
                  drop_cond: float = 0.0):
        z = self.batch_latents(batch, k, bs)
        c = xc = None
        if self.routed:  # an embedder list: each drops at its own rate (drop_cond > 0: training)
            xc = self.raw_condition(batch, bs)
            c = self.conditioner(xc, drop=drop_cond > 0, rng=self.batch_random)
        elif self.model.conditioning_key is not None:
            xc = self.raw_condition(batch, bs)
            c = self.drop_condition(xc, drop_cond)
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(c)
                if self.inpaint_mode is InpaintMode.PAPER and "mask" in batch:  # the paper's inpainting model
                    c = self.with_mask(c, super().get_input(batch, "mask")[:bs])
        out = [z, c]
        if return_first_stage_outputs:
            xrec = self.decode_first_stage(z)
            x = super().get_input(batch, k).to(self.device)[:bs] if k in batch else xrec  # cached: no image kept
            out.extend([x, xrec])
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch: dict):
        if self.routed:  # the embedders' gradients flow where they train
            z = self.batch_latents(batch, self.first_stage_key)
            c = self.conditioner(self.raw_condition(batch), drop=self.training, rng=self.batch_random)
            return self.p_losses(z, c, sample_weights=self.item_weights(batch))
        z, c = self.get_input(batch, self.first_stage_key, drop_cond=self.ucg_rate if self.training else 0.0)
        if self.cond_stage_trainable and c is not None:
            with torch.enable_grad():
                c = self.get_learned_conditioning(c)
        return self.p_losses(z, c, sample_weights=self.item_weights(batch))

    def apply_network(self, net: torch.nn.Module, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None,
                      guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cond is None:
            return net(x_noisy, t, guidance=guidance)
        if not isinstance(cond, dict):
            cond = {self.model.conditioning_key.plain_key: cond if isinstance(cond, list) else [cond]}
        return net(x_noisy, t, **cond, guidance=guidance)

    # -- images -----------------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 4, sample: bool = True, ddim_steps: Optional[int] = None,
                   plot_diffusion_rows: bool = True, unconditional_guidance_scale: Optional[float] = None,
                   sampler: Optional[str] = None, **kwargs) -> dict[str, torch.Tensor]:
        """Inputs, reconstructions, the diffusion row, and samples with and without guidance."""
        log: dict[str, torch.Tensor] = {}
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        n = z.shape[0]
        log["inputs"], log["reconstruction"] = x, xrec
        if isinstance(xc, torch.Tensor) and xc.dim() == 4 and xc.shape[1] in (1, 3):  # image conditions: LR, masked
            log["conditioning"] = xc
        if plot_diffusion_rows:
            rows = []
            for t in range(0, self.num_timesteps, max(1, self.num_timesteps // 5)):
                tt = torch.full((min(n, n_row),), t, device=self.device, dtype=torch.long)
                rows.append(self.decode_first_stage(self.q_sample(z[:n_row], tt)))
            log["diffusion_row"] = torch.cat(rows)
        if sample:
            scale = self.guidance_scale if unconditional_guidance_scale is None else unconditional_guidance_scale
            runs = {"samples": Conditioning(c)}
            if scale != 1.0 and xc is not None:
                runs[f"samples_cfg_scale_{scale:.2f}"] = Conditioning(c, self.unconditional_like(c, xc))
            with self.ema_scope("sampling"):
                for name, cond in runs.items():
                    log[name] = generation.generate(self, cond, n, steps=ddim_steps, sampler=sampler,
                                                    scale=1.0 if cond.uncond is None else scale,
                                                    generator=torch.Generator(device=self.device).manual_seed(0))
        return log
