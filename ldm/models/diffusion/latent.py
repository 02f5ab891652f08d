"""LatentDiffusion (Rombach et al. 2022): DDPM on the latents of a frozen first stage, with a conditioner."""
from __future__ import annotations

import logging
from enum import Enum
from typing import Any, Optional

import torch
import torch.distributed as dist

from ldm.data.latents import LATENT_KEY
from ldm.models.diffusion.diffusion_module import DDPM, disabled_train
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


# condition keys passed through as they are (CompVis `get_input`): text, boxes and class labels
UNPERMUTED_COND_KEYS = ("caption", "txt", "coordinates_bbox", "class_label", "cls")


class Encoding(str, Enum):
    """How an image's first-stage encoding becomes latents: a posterior sample (training, as CompVis trains) or the
    posterior's mode (tasks on a given image: img2img, inpainting; deterministic). A VQ or identity first stage
    returns a tensor, which both policies take as it is."""
    SAMPLE = "sample"
    MODE = "mode"


def unscaled_latents(encoder_posterior, encoding: Encoding = Encoding.SAMPLE) -> torch.Tensor:
    """The first stage's latents under `encoding`: for a KL autoencoder a posterior sample or its mode, for any
    other first stage the tensor itself."""
    if isinstance(encoder_posterior, DiagonalGaussianDistribution):
        return encoder_posterior.mode() if Encoding(encoding) is Encoding.MODE else encoder_posterior.sample()
    if isinstance(encoder_posterior, torch.Tensor):
        return encoder_posterior
    raise TypeError(f"encoder output of type '{type(encoder_posterior).__name__}' not understood")


def null_condition_like(c: Any, key: str, null_label: Optional[int] = None) -> Any:
    """The raw "no condition" of the kind of `c` (condition key `key`): empty strings, the null class, zeros."""
    if isinstance(c, (list, tuple)) and all(isinstance(s, str) for s in c):
        return [""] * len(c)
    if isinstance(c, torch.Tensor) and not torch.is_floating_point(c):
        if null_label is None:
            raise ValueError(f"cond_stage_key '{key}': the conditioner has no null class "
                             f"(set ucg_rate: 0 or use a ClassEmbedder with a null class)")
        return torch.full_like(c, int(null_label))
    if isinstance(c, torch.Tensor):
        return torch.zeros_like(c)
    raise TypeError(f"cannot form a null condition for '{key}' of type {type(c).__name__}")


def drop_conditions(c: Any, p: float, null: Any) -> Any:
    """Each item of `c` replaced by its item of `null` with probability p (classifier-free guidance training)."""
    if isinstance(c, torch.Tensor):  # drawn where `c` lives: a host-to-device copy would wait for the GPU
        drop = torch.rand(len(c), device=c.device) < p
        return torch.where(drop.view(-1, *([1] * (c.dim() - 1))), null, c)
    drop = torch.rand(len(c)) < p
    return [nl if d else x for x, nl, d in zip(c, null, drop.tolist())]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (B, 1, H, W) mask at the latent size by nearest-neighbour resampling (CompVis and SD2 inpainting)."""
    return torch.nn.functional.interpolate(mask.float(), size=tuple(size), mode="nearest")


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class LatentDiffusion(DDPM):
    """The LDM: `first_stage_model` (frozen AE), `cond_stage_model` (conditioner), `model` (UNet wrapper)."""

    def __init__(self, first_stage_config, cond_stage_config, num_timesteps_cond: Optional[int] = None,
                 cond_stage_key: str = "image", cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: Optional[str] = None, conditioning_key: Optional[str] = None,
                 scale_factor: float = 1.0, scale_by_std: bool = False, *args: Any, **kwargs: Any):
        self.num_timesteps_cond = num_timesteps_cond or 1
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError("num_timesteps_cond must not exceed timesteps")
        if self.num_timesteps_cond > 1:  # CompVis' shortened conditioning schedule; no published config uses it
            raise ValueError(f"num_timesteps_cond={self.num_timesteps_cond}: noising the conditioning on a shortened "
                             f"schedule is not implemented here; use 1 (every published config does)")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
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
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
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

    def networks(self) -> list[torch.nn.Module]:
        """UNet (and EMA copy), first stage and conditioner: what `set_weights_dtype` casts."""
        parts = super().networks() + [self.first_stage_model]
        if self.cond_stage_model is not None and self.cond_stage_model is not self.first_stage_model:
            parts.append(self.cond_stage_model)
        return parts

    def trainable_parameters(self) -> list:
        params = super().trainable_parameters()
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            params += list(self.cond_stage_model.parameters())
        return params

    # -- first stage ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior) -> torch.Tensor:
        """A posterior sample (not its mode) times scale_factor, as trained in CompVis."""
        return self.scale_factor * unscaled_latents(encoder_posterior, Encoding.SAMPLE)

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
            z = unscaled_latents(self.encode_batch(batch, self.first_stage_key)).detach().double().flatten()
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
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    def null_condition(self, c: Any) -> Any:
        """The raw "no condition" of the same kind: empty strings, the null class, zeros."""
        return null_condition_like(c, self.cond_stage_key, getattr(self.cond_stage_model, "null_label", None))

    def drop_condition(self, c: Any, p: float) -> Any:
        """Classifier-free guidance training: replace each item's condition by the null one with probability p."""
        return drop_conditions(c, p, self.null_condition(c)) if p > 0 else c

    def get_unconditional_conditioning(self, c_raw: Any) -> Any:
        return self.get_learned_conditioning(self.null_condition(c_raw))

    def unconditional_like(self, c: Any, c_raw: Any) -> Any:
        """The guidance's unconditional input matching the conditioning `c` (of the raw condition `c_raw`)."""
        return self.get_unconditional_conditioning(c_raw)

    def raw_condition(self, batch: dict, bs: Optional[int] = None) -> Any:
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
    def get_input(self, batch: dict, k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
                  cond_key: Optional[str] = None, return_original_cond: bool = False, bs: Optional[int] = None,
                  drop_cond: float = 0.0):
        z = self.get_first_stage_encoding(self.encode_batch(batch, k, bs)).detach()
        c = xc = None
        if self.model.conditioning_key is not None:
            xc = self.raw_condition(batch, bs)
            c = self.drop_condition(xc, drop_cond)
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(c)
                if self._paper_inpainting(batch):  # the LDM inpainting layout: masked-image latent + mask
                    c = torch.cat([c, resize_mask(super().get_input(batch, "mask").to(c.device)[:bs], c.shape[-2:])], 1)
        out = [z, c]
        if return_first_stage_outputs:
            xrec = self.decode_first_stage(z)
            x = super().get_input(batch, k).to(self.device)[:bs] if k in batch else xrec  # cached: no image kept
            out.extend([x, xrec])
        if return_original_cond:
            out.append(xc)
        return out

    def _paper_inpainting(self, batch: dict) -> bool:
        """The paper's inpainting model (CompVis inpainting_big): concat of the encoded `masked_image` and the `mask`."""
        return (self.model.conditioning_key == "concat" and self.cond_stage_key == "masked_image"
                and self.cond_stage_model is self.first_stage_model and "mask" in batch)

    def shared_step(self, batch: dict):
        z, c = self.get_input(batch, self.first_stage_key, drop_cond=self.ucg_rate if self.training else 0.0)
        if self.cond_stage_trainable and c is not None:
            with torch.enable_grad():
                c = self.get_learned_conditioning(c)
        return self.p_losses(z, c)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None, return_ids: bool = False):
        if cond is None:
            return self.model(x_noisy, t)
        if not isinstance(cond, dict):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)

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
            g = torch.Generator(device=self.device).manual_seed(0)
            with self.ema_scope("sampling"):
                log["samples"] = self.decode_first_stage(
                    self.sample(c, n, steps=ddim_steps, sampler=sampler, guidance_scale=1.0, generator=g))
                scale = self.guidance_scale if unconditional_guidance_scale is None else unconditional_guidance_scale
                if scale != 1.0 and xc is not None:
                    uc = self.unconditional_like(c, xc)
                    g = torch.Generator(device=self.device).manual_seed(0)
                    log[f"samples_cfg_scale_{scale:.2f}"] = self.decode_first_stage(
                        self.sample(c, n, steps=ddim_steps, sampler=sampler, guidance_scale=scale, uncond=uc,
                                    generator=g))
        return log
