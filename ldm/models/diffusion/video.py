"""The video LDM (Blattmann et al. 2023, "Align your Latents"): a pretrained image LDM's weights under a VideoUNet, its
temporal layers trained on clips while the image layers stay frozen; frames encoded and decoded one by one."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from einops import rearrange

from ldm.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_state_dict_checked
from ldm.errors import InputError
from ldm.models.diffusion.inpaint import FIRST_CONV_KEYS, widen_input_channels
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.models.diffusion.video_context import ContextFrames, context_concat, prediction_mask
from ldm.modules.diffusionmodules.temporal_mix import MergeStrategy
from ldm.modules.diffusionmodules.video_model import VideoUNet
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.model_inputs import LATENT_KEY, Encoding, unscaled_latents
from ldm.sampling import Conditioning
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

# the batch key of the per-item flag "this clip is single images" (1) or "a video" (0): (B,) or (B, T)
IMAGE_ONLY_KEY = "image_only_indicator"


class VideoLatentDiffusion(LatentDiffusion):
    """A LatentDiffusion over clips: `first_stage_key` holds (B, T, H, W, C) videos, the UNet is a VideoUNet.

    `image_ckpt_path`: the image LDM to start from; its weights are loaded strictly (every key of the checkpoint
    used, every image layer of this model filled) and the temporal layers, reported as new, start so that the model
    computes the image model's function (`VideoUNet.start_as_image_model`). Only the temporal layers train unless
    `train_spatial`; the EMA follows what trains. `frame_chunk`: frames per first-stage call (bounded memory).
    `num_frames`: the clip length sampling uses by default (training takes it from the data). `context_frames`
    ({modes: [none, predict, interpolate], max_given}): train for prediction and interpolation too (sec. 3.2-3.3),
    the given frames' latents and mask concatenated to the input (the image checkpoint's input convolution widened
    with zeros for them); `continue_clips` then extends clips, repeatedly for long ones.
    """

    # config keys naming weights a run starts from, which its own checkpoints hold (dropped when sampling, ldm.runs)
    init_weight_keys = ("image_ckpt_path",)

    def __init__(self, *args: Any, image_ckpt_path: Optional[str] = None, train_spatial: bool = False,
                 frame_chunk: int = 8, num_frames: int = 8, image_only_key: str = IMAGE_ONLY_KEY,
                 image_ema: bool = True, context_frames: Optional[dict] = None, **kwargs: Any):
        ckpt_path, ignore_keys = kwargs.pop("ckpt_path", None), kwargs.pop("ignore_keys", [])
        super().__init__(*args, **kwargs)
        net = self.model.diffusion_model
        if not isinstance(net, VideoUNet):
            raise ConfigError(f"model.params.unet_config: a VideoLatentDiffusion needs a VideoUNet "
                              f"(ldm.modules.diffusionmodules.video_model.VideoUNet), got {type(net).__name__}")
        if frame_chunk < 1 or num_frames < 1:
            raise ConfigError(f"model.params: frame_chunk ({frame_chunk}) and num_frames ({num_frames}) must be >= 1")
        self.train_spatial, self.frame_chunk, self.num_frames = train_spatial, int(frame_chunk), int(num_frames)
        self.image_only_key = image_only_key
        # prediction / interpolation: context frames' latents and their mask concatenated to the input
        self.context_frames = ContextFrames.from_config(context_frames) if context_frames is not None else None
        if self.context_frames is not None and net.in_channels != 2 * self.channels + 1:
            raise ConfigError(f"model.params.unet_config.params.in_channels is {net.in_channels}; with context_frames "
                              f"the UNet reads the latents, the context latents and the mask: "
                              f"{2 * self.channels + 1} channels")
        if image_ckpt_path is not None:
            self.init_from_image_ckpt(image_ckpt_path, use_ema_weights=image_ema)
        if not train_spatial:
            for name, p in self.model.named_parameters():
                if not net.is_temporal_key(name):
                    p.requires_grad_(False)
        if self.use_ema:  # the EMA follows what trains, from the weights it starts with
            self.model_ema = LitEma(self.model, decay=float(self.model_ema.decay))
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    # -- starting from an image LDM ------------------------------------------------------------------
    @property
    def unet(self) -> VideoUNet:
        return self.model.diffusion_model

    def init_from_image_ckpt(self, path: Union[str, Path], use_ema_weights: bool = True) -> list[str]:
        """Load an image LDM's checkpoint: every key used, every non-temporal weight filled; returns the temporal
        keys it did not have (new, initialised so the model starts as the image model)."""
        sd = extract_state_dict(load_checkpoint(path))
        if any(k.startswith("model.diffusion_model.") and self.unet.is_temporal_key(k) for k in sd):
            raise CheckpointError(f"{path}: already holds temporal layers; give it as model.params.ckpt_path to "
                                  f"continue a video model, image_ckpt_path is for an image LDM")
        ema_shadows = {s: n for n, s in self.model_ema.m_name2s_name.items()} if self.use_ema else {}
        temporal_shadow = {"model_ema." + s for s, n in ema_shadows.items() if self.unet.is_temporal_key(n)}
        had_ema = any(k.startswith("model_ema.") and k[len("model_ema."):] in ema_shadows for k in sd)
        if not self.use_ema:
            sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}

        def is_new(key: str) -> bool:
            return key in temporal_shadow or (key.startswith("model.diffusion_model.") and self.unet.is_temporal_key(key))

        own_sd = self.state_dict()
        if self.context_frames is not None:  # the image UNet's input conv reads the latents only: widen with zeros
            widened = widen_input_channels(sd, own_sd, FIRST_CONV_KEYS, self.channels)
            if widened:
                logger.info("%s: widened for the context frames: %s", path, "; ".join(widened))
        own = set(own_sd)
        wrong = sorted(k for k in own - set(sd) if not is_new(k)) + sorted(set(sd) - own)
        if wrong:
            raise CheckpointError(f"{path}: not the image LDM of this video model (model.params.image_ckpt_path): "
                                  f"{len(wrong)} keys do not match, e.g. {wrong[:5]}; the image layers must match "
                                  f"the checkpoint's exactly")
        missing, _ = load_state_dict_checked(self, sd, strict=False, source=str(path), expected_missing=is_new)
        new = [k for k in missing if k.startswith("model.diffusion_model.")]
        if self.use_ema and had_ema and use_ema_weights:  # the image model as it samples: its EMA weights
            self.model_ema.copy_to(self.model)
        self.unet.start_as_image_model()
        self.restarted_from_ckpt = True  # the image model's scale_factor, not measured again (scale_by_std)
        logger.info("%s: image LDM loaded; %d temporal weights are new (%s, ...), started as the image model",
                    path, len(new), ", ".join(new[:3]))
        return new

    # -- clips through the first stage --------------------------------------------------------------
    def clips_of(self, batch: dict, k: str, bs: Optional[int] = None) -> torch.Tensor:
        """`batch[k]` as (B, C, T, H, W) in [-1, 1]."""
        if k not in batch:
            raise KeyError(f"batch has no key '{k}' (first_stage_key); keys: {sorted(batch)}")
        if not isinstance(batch[k], torch.Tensor) or batch[k].dim() != 5:
            shape = tuple(batch[k].shape) if isinstance(batch[k], torch.Tensor) else type(batch[k]).__name__
            raise InputError(f"batch['{k}'] is {shape}; a video model takes clips (B, T, H, W, C)")
        x = self.get_input_frames(batch, k)
        return x[:bs] if bs is not None else x

    def get_input_frames(self, batch: dict, k: str) -> torch.Tensor:
        return super(LatentDiffusion, self).get_input(batch, k).to(self.device)  # DDPM's: channels first

    @torch.no_grad()
    def encode_frames(self, clips: torch.Tensor):
        """The first stage's output for every frame of (B, C, T, H, W) clips, `frame_chunk` frames per call, as one
        output over the (B T) frames."""
        frames = rearrange(clips, "b c t h w -> (b t) c h w")
        parts = [self.encode_first_stage(chunk) for chunk in frames.split(self.frame_chunk)]
        if all(isinstance(p, DiagonalGaussianDistribution) for p in parts):
            return DiagonalGaussianDistribution(torch.cat([p.parameters for p in parts]))
        return torch.cat(parts)

    @torch.no_grad()
    def batch_latents(self, batch: dict, k: str, bs: Optional[int] = None) -> torch.Tensor:
        """(B, C', T, h, w) scaled latents of the batch's clips, encoded frame by frame (or cached, ldm.data.latents)."""
        if LATENT_KEY in batch:
            moments = batch[LATENT_KEY][:bs] if bs is not None else batch[LATENT_KEY]
            if moments.dim() != 5:
                raise InputError(f"batch['{LATENT_KEY}'] has shape {tuple(moments.shape)}; a video model's cached "
                                 f"latents are clips (B, C, T, h, w): cache the clips' dataset (CachedLatents)")
            return self.get_first_stage_encoding(self._posterior_from_cache(moments)).detach()
        clips = self.clips_of(batch, k, bs)
        z = self.get_first_stage_encoding(self.encode_frames(clips)).detach()
        return rearrange(z, "(b t) c h w -> b c t h w", b=clips.shape[0])

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Images of latents: (B, C', T, h, w) clips decoded `frame_chunk` frames at a time to (B, C, T, H, W); a
        temporal decoder (ldm.modules.temporal_ae) sees each chunk of a clip as a clip."""
        if z.dim() != 5:
            return super().decode_first_stage(z)
        if getattr(self.first_stage_model, "decodes_clips", False):  # a temporal decoder: each clip in time chunks
            clips = [torch.cat([self.first_stage_model.decode(chunk.movedim(1, 0) / self.scale_factor,
                                                              timesteps=chunk.shape[1])
                                for chunk in clip.split(self.frame_chunk, dim=1)]) for clip in z]
            return torch.stack(clips).movedim(1, 2)  # (B, T, C, H, W) -> (B, C, T, H, W)
        frames = rearrange(z, "b c t h w -> (b t) c h w")
        out = torch.cat([super(VideoLatentDiffusion, self).decode_first_stage(chunk)
                         for chunk in frames.split(self.frame_chunk)])
        return rearrange(out, "(b t) c h w -> b c t h w", b=z.shape[0])

    @property
    def native_sample_shape(self) -> tuple[int, ...]:
        """The latent clip sampling draws by default: (C, num_frames, H, W)."""
        return (self.channels, self.num_frames, self.image_size, self.image_size)

    # -- joint image + video batches ----------------------------------------------------------------
    def image_only(self, batch: dict, clips: int, frames: int) -> Optional[torch.Tensor]:
        """The batch's (B, T) image-only indicator (items that are T independent images), or None (all videos)."""
        flag = batch.get(self.image_only_key)
        if flag is None:
            return None
        flag = torch.as_tensor(flag, device=self.device).float()[:clips]
        if flag.dim() == 1:
            flag = flag[:, None].expand(-1, frames)
        if tuple(flag.shape) != (clips, frames):
            raise InputError(f"batch['{self.image_only_key}'] has shape {tuple(flag.shape)}; expected ({clips},) or "
                             f"({clips}, {frames})")
        # the strategy first: under learned_with_images (the usual case) no device value is read each step
        if self.unet.merge_strategy != MergeStrategy.LEARNED_WITH_IMAGES.value and bool(flag.any()):
            raise ConfigError(f"batch['{self.image_only_key}'] marks image items, but the VideoUNet's merge_strategy "
                              f"is '{self.unet.merge_strategy}': images in a video batch need learned_with_images "
                              f"(alpha = 1 for them)")
        return flag

    def with_video_inputs(self, c: Any, indicator: Optional[torch.Tensor]) -> Any:
        """The conditioning with the image-only indicator added (a dict of the UNet's keywords)."""
        if indicator is None:
            return c
        if c is None:
            return {IMAGE_ONLY_KEY: indicator}
        if not isinstance(c, dict):
            c = {self.model.conditioning_key.plain_key: c if isinstance(c, list) else [c]}
        return {**c, IMAGE_ONLY_KEY: indicator}

    def shared_step(self, batch: dict):
        if self.routed:
            z = self.batch_latents(batch, self.first_stage_key)
            c = self.conditioner(self.raw_condition(batch), drop=self.training, rng=self.batch_random)
        else:
            z, c = self.get_input(batch, self.first_stage_key, drop_cond=self.ucg_rate if self.training else 0.0)
            if self.cond_stage_trainable and c is not None:
                with torch.enable_grad():
                    c = self.get_learned_conditioning(c)
        c = self.with_video_inputs(c, self.image_only(batch, z.shape[0], z.shape[2]))
        if self.context_frames is not None:
            c = self.with_context(c, context_concat(z, self.context_frames.draw(z.shape[0], z.shape[2], z.device)))
        return self.p_losses(z, c, sample_weights=self.item_weights(batch))

    # -- prediction and interpolation ---------------------------------------------------------------
    def with_context(self, c: Any, concat: torch.Tensor) -> dict:
        """The conditioning with the context frames' input (`context_concat`) as c_concat."""
        if c is None:
            return {"c_concat": [concat]}
        if not isinstance(c, dict):
            c = {self.model.conditioning_key.plain_key: c if isinstance(c, list) else [c]}
        return {**c, "c_concat": [concat]}

    @torch.no_grad()
    def clip_latents(self, clips: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C', T, h, w) of (B, C, T, H, W) clips in [-1, 1] (the posterior mode)."""
        z = self.scale_factor * unscaled_latents(self.encode_frames(clips.to(self.device)), Encoding.MODE)
        return rearrange(z, "(b t) c h w -> b c t h w", b=clips.shape[0])

    def context_conditioning(self, base: Conditioning, z: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """`base` with the context of latents `z` (B, C', T, h, w) at the frames `mask` (B, T) gives; its unconditional
        branch has no context (context guidance, as the text's)."""
        if self.context_frames is None:
            raise ConfigError("this video model was not trained with context frames (model.params.context_frames)")
        cond = self.with_context(base.cond, context_concat(z, mask))
        uncond = None
        if base.uncond is not None:
            uncond = self.with_context(base.uncond, context_concat(torch.zeros_like(z), torch.zeros_like(mask)))
        return Conditioning(cond, uncond)

    @torch.no_grad()
    def continue_clips(self, clips: torch.Tensor, given: int, *, prompts: Optional[Sequence[str]] = None,
                       labels: Any = None, steps: Optional[int] = None, scale: Optional[float] = None,
                       sampler: Optional[str] = None, generator: Any = None) -> torch.Tensor:
        """Prediction (sec. 3.2): (B, C, T0, H, W) clips in [-1, 1] extended by num_frames - `given` frames generated
        with their last `given` frames as context; call it again on the result for longer clips."""
        from ldm import generation

        t = self.num_frames
        if not 1 <= given < t or given > clips.shape[2]:
            raise InputError(f"continue_clips: given {given} must be in [1, {t - 1}] and at most the clips' "
                             f"{clips.shape[2]} frames")
        scale = self.guidance_scale if scale is None else scale
        ctx = self.clip_latents(clips[:, :, -given:])
        z = torch.zeros(ctx.shape[0], ctx.shape[1], t, *ctx.shape[-2:], device=ctx.device)
        z[:, :, :given] = ctx
        mask = prediction_mask(t, given, ctx.device).expand(ctx.shape[0], -1)
        base = self.conditioning(prompts=prompts, labels=labels, guidance=scale != 1.0)
        out = generation.generate(self, self.context_conditioning(base, z, mask), ctx.shape[0], steps=steps,
                                  sampler=sampler, scale=scale, generator=generator)
        return torch.cat([clips.to(out.device), out[:, :, given:]], dim=2)

    def _bs(self, batch: dict) -> int:
        return int((batch[LATENT_KEY] if LATENT_KEY in batch else batch[self.first_stage_key]).shape[0])

    # -- logging ------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 2, n_row: int = 4, sample: bool = True,
                   ddim_steps: Optional[int] = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Input clips, their reconstructions and samples, each as a frame strip (rows: clips, columns: frames)."""
        from ldm import generation

        z, c, x, xrec = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                       force_c_encode=True, bs=N)
        log = {"inputs": frame_strip(x), "reconstruction": frame_strip(xrec)}
        if sample:
            with self.ema_scope("sampling"):
                out = generation.generate(self, generation.Conditioning(c), z.shape[0], steps=ddim_steps,
                                          shape=tuple(z.shape[1:]),
                                          generator=torch.Generator(device=self.device).manual_seed(0))
            log["samples"] = frame_strip(out)
        return log


def frame_strip(clips: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) clips as B images (C, H, T W): each clip's frames side by side."""
    return rearrange(clips, "b c t h w -> b c h (t w)")


def trainable_names(model: VideoLatentDiffusion) -> Sequence[str]:
    """The UNet parameters that train (for messages and tests)."""
    return [n for n, p in model.model.named_parameters() if p.requires_grad]
