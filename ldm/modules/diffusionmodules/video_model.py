"""The video UNet: the image UNet with a temporal res-block after each res-block and a temporal transformer after each
spatial one, merged by alpha (Blattmann et al. 2023, "Align your Latents", sec. 3.1; sgm's `VideoUNet` key layout,
which Stable Video Diffusion uses)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from einops import rearrange
from torch import nn

from ldm.config_keys import report_no_effect
from ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
from ldm.modules.diffusionmodules.temporal_mix import AlphaBlender, MergeStrategy
from ldm.modules.diffusionmodules.util import MAX_PERIOD, UNET_NORM_GROUPS
from ldm.modules.video_attention import SpatialVideoTransformer

VIDEO_INPUTS = ("time_context", "num_video_frames", "image_only_indicator")


class VideoResBlock(ResBlock):
    """A ResBlock on each frame, then a ResBlock over (b, c, t, h, w) with a (3, 1, 1) kernel (`time_stack`), the two
    merged by an AlphaBlender (`time_mixer`)."""

    block_inputs = ("emb", "output_size", "num_video_frames", "image_only_indicator")

    def __init__(self, channels: int, emb_channels: int, dropout: float, video_kernel_size: Union[int, Sequence[int]] = 3,
                 merge_strategy: str = MergeStrategy.FIXED.value, merge_factor: float = 0.5,
                 out_channels: Optional[int] = None, use_conv: bool = False, use_scale_shift_norm: bool = False,
                 dims: int = 2, use_checkpoint: bool = False, up: bool = False, down: bool = False,
                 norm_groups: int = UNET_NORM_GROUPS):
        super().__init__(channels, emb_channels, dropout, out_channels=out_channels, use_conv=use_conv,
                         use_scale_shift_norm=use_scale_shift_norm, dims=dims, use_checkpoint=use_checkpoint,
                         up=up, down=down, norm_groups=norm_groups)
        self.time_stack = ResBlock(self.out_channels, emb_channels, dropout, out_channels=self.out_channels, dims=3,
                                   use_scale_shift_norm=False, kernel_size=video_kernel_size, exchange_temb_dims=True,
                                   norm_groups=norm_groups)
        self.time_mixer = AlphaBlender(alpha=merge_factor, merge_strategy=merge_strategy,
                                       rearrange_pattern="b t -> b 1 t 1 1")

    def forward(self, x: torch.Tensor, emb: torch.Tensor, output_size: Optional[Sequence[int]] = None,
                num_video_frames: Optional[int] = None,
                image_only_indicator: Optional[torch.Tensor] = None) -> torch.Tensor:
        if num_video_frames is None:
            raise ValueError("VideoResBlock needs num_video_frames (frames per clip of the (b t) batch)")
        t = num_video_frames
        x = super().forward(x, emb, output_size)
        spatial = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        temporal = self.time_stack(spatial, rearrange(emb, "(b t) ... -> b t ...", t=t))
        return rearrange(self.time_mixer(spatial, temporal, image_only_indicator), "b c t h w -> (b t) c h w")


class VideoUNet(UNetModel):
    """UNetModel whose res-blocks are VideoResBlocks and attention layers SpatialVideoTransformers.

    Frames travel as (b t) c h w with `num_video_frames` = t, as in sgm; a (b, c, t, h, w) input is taken too (the
    framework's video latents: one sampler item, so one seed, per clip), with per-clip timesteps, context and y
    repeated per frame, and comes back in that shape. `image_only_indicator` (b, t) is 1 where an item is a single
    image (alpha = 1 there under `learned_with_images`); absent, every item is a video frame.
    """

    extra_inputs = VIDEO_INPUTS

    def __init__(self, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: Union[int, Sequence[int]], attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: Optional[Union[int, str]] = None, use_checkpoint: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 transformer_depth: Union[int, Sequence[int]] = 1, transformer_depth_middle: Optional[int] = None,
                 context_dim: Optional[int] = None, time_downup: bool = False, time_context_dim: Optional[int] = None,
                 extra_ff_mix_layer: bool = False, use_spatial_context: bool = False,
                 merge_strategy: str = MergeStrategy.FIXED.value, merge_factor: float = 0.5,
                 spatial_transformer_attn_type: str = "softmax", video_kernel_size: Union[int, Sequence[int]] = 3,
                 use_linear_in_transformer: bool = False, adm_in_channels: Optional[int] = None,
                 disable_temporal_crossattention: bool = False, max_ddpm_temb_period: int = MAX_PERIOD,
                 norm_groups: int = UNET_NORM_GROUPS, channels_last: bool = True, image_size: Optional[int] = None):
        if context_dim is None:
            raise ValueError("VideoUNet needs context_dim (its spatial and temporal transformers cross-attend)")
        if dims != 2:
            raise ValueError(f"VideoUNet: dims {dims}; its spatial layers are 2-d (the temporal ones 3-d)")
        if time_downup:
            raise NotImplementedError("VideoUNet: time_downup (down/upsampling over time) is not provided")
        depth = [transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int) else list(transformer_depth)
        if transformer_depth_middle is not None and transformer_depth_middle != depth[-1]:
            raise NotImplementedError(f"VideoUNet: transformer_depth_middle {transformer_depth_middle} other than the "
                                      f"last level's depth {depth[-1]} is not provided")
        if spatial_transformer_attn_type not in ("softmax", "softmax-xformers"):
            raise ValueError(f"VideoUNet: spatial_transformer_attn_type {spatial_transformer_attn_type!r} is not "
                             "'softmax' or 'softmax-xformers'")
        if spatial_transformer_attn_type != "softmax":  # attention is torch's SDPA (memory-efficient) or the CPU kernel
            report_no_effect("VideoUNet", ["spatial_transformer_attn_type"])
        self.merge_strategy = MergeStrategy.named(merge_strategy, "VideoUNet").value
        self.merge_factor, self.video_kernel_size = merge_factor, video_kernel_size
        self.time_context_dim, self.extra_ff_mix_layer = time_context_dim, extra_ff_mix_layer
        self.use_spatial_context, self.disable_temporal_crossattention = use_spatial_context, disable_temporal_crossattention
        self.max_ddpm_temb_period = max_ddpm_temb_period
        super().__init__(image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                         dropout=dropout, channel_mult=channel_mult, conv_resample=conv_resample, dims=dims,
                         num_classes=num_classes, use_checkpoint=use_checkpoint, num_heads=num_heads,
                         num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
                         use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                         use_spatial_transformer=True, transformer_depth=depth, context_dim=context_dim, legacy=False,
                         use_linear_in_transformer=use_linear_in_transformer, adm_in_channels=adm_in_channels,
                         norm_groups=norm_groups, channels_last=channels_last)

    # -- the two factories a video UNet changes --------------------------------------------------------------
    def make_resblock(self, ch_in: int, ch_out: int, level: int, **kw: Any) -> nn.Module:
        """A VideoResBlock (the resampling variants too)."""
        return VideoResBlock(ch_in, self.emb_channels, self.dropout, video_kernel_size=self.video_kernel_size,
                             merge_strategy=self.merge_strategy, merge_factor=self.merge_factor, out_channels=ch_out,
                             dims=self.dims, use_checkpoint=self.use_checkpoint,
                             use_scale_shift_norm=self.use_scale_shift_norm, norm_groups=self.norm_groups, **kw)

    def make_attention(self, ch: int, level: int, self_attn_off: bool = False,
                       num_heads: Optional[int] = None) -> nn.Module:
        """A SpatialVideoTransformer."""
        nh, dh = self.heads_for(ch)
        return SpatialVideoTransformer(ch, nh, dh, depth=self.transformer_depth[level], context_dim=self.context_dim,
                                       use_linear=self.use_linear_in_transformer, use_spatial_context=self.use_spatial_context,
                                       merge_strategy=self.merge_strategy, merge_factor=self.merge_factor,
                                       time_context_dim=self.time_context_dim, ff_in=self.extra_ff_mix_layer,
                                       checkpoint=self.use_checkpoint,
                                       disable_temporal_crossattention=self.disable_temporal_crossattention,
                                       max_time_embed_period=self.max_ddpm_temb_period, norm_groups=self.norm_groups)

    # -- what is new relative to the image UNet --------------------------------------------------------------
    def temporal_modules(self) -> list[nn.Module]:
        """The temporal layers (time_stack, time_mixer, time_pos_embed of every block): what video training trains."""
        found = []
        for m in self.modules():
            if isinstance(m, (VideoResBlock, SpatialVideoTransformer)):
                found += [m.time_stack, m.time_mixer] + ([m.time_pos_embed] if hasattr(m, "time_pos_embed") else [])
        return found

    def is_temporal_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to a temporal layer (absent from an image UNet's checkpoint)."""
        return any(part in ("time_stack", "time_mixer", "time_pos_embed") for part in key.split("."))

    @torch.no_grad()
    def start_as_image_model(self) -> "VideoUNet":
        """Zero every temporal branch's output layers, so each temporal layer returns its input and the network
        computes the image UNet's function per frame (up to rounding of the alpha merge) whatever alpha is."""
        for m in self.modules():
            if isinstance(m, SpatialVideoTransformer):
                for layer in m.temporal_output_layers():
                    for p in layer.parameters():
                        p.zero_()
            elif isinstance(m, VideoResBlock):
                for p in m.time_stack.out_layers[-1].parameters():
                    p.zero_()
        return self

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, guidance: Optional[torch.Tensor] = None, **inputs: Any) -> torch.Tensor:
        unknown = sorted(set(inputs) - set(self.extra_inputs))
        if unknown:  # before any reshaping, named as the image UNet names them
            return super().forward(x, timesteps, context, y, guidance, **inputs)
        frames = inputs.get("num_video_frames")
        clips = x.dim() == 5
        if clips:
            b, _, t = x.shape[:3]
            if frames is not None and int(frames) != t:
                raise ValueError(f"VideoUNet: num_video_frames {frames} but the (b, c, t, h, w) input has {t} frames")
            frames = t
            x = rearrange(x, "b c t h w -> (b t) c h w")
            timesteps, context, y = (_per_frame(v, b, t) for v in (timesteps, context, y))
            if isinstance(inputs.get("time_context"), torch.Tensor) and inputs["time_context"].shape[0] != b:
                raise ValueError(f"VideoUNet: time_context has {inputs['time_context'].shape[0]} items for {b} clips")
        elif x.dim() != 4:
            raise ValueError(f"VideoUNet: input of shape {tuple(x.shape)}; expected (b t, c, h, w) or (b, c, t, h, w)")
        if frames is None:
            raise ValueError("VideoUNet: num_video_frames is needed for a (b t, c, h, w) input (or give (b, c, t, h, w))")
        frames = int(frames)
        if x.shape[0] % frames:
            raise ValueError(f"VideoUNet: {x.shape[0]} items are not whole clips of num_video_frames {frames}")
        indicator = inputs.get("image_only_indicator")
        if indicator is None:
            indicator = torch.zeros(x.shape[0] // frames, frames, device=x.device)
        elif tuple(indicator.shape) != (x.shape[0] // frames, frames):
            raise ValueError(f"VideoUNet: image_only_indicator of shape {tuple(indicator.shape)}; expected "
                             f"(clips, frames) = {(x.shape[0] // frames, frames)}")
        if isinstance(timesteps, torch.Tensor) and timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        out = super().forward(x, timesteps, context, y, guidance, num_video_frames=frames,
                              image_only_indicator=indicator, time_context=inputs.get("time_context"))
        return rearrange(out, "(b t) c h w -> b c t h w", t=frames).contiguous() if clips else out


def _per_frame(value: Any, clips: int, frames: int) -> Any:
    """A per-clip tensor (first dim `clips`) repeated for each of the clip's frames; per-frame ones pass through."""
    if isinstance(value, (list, tuple)):
        return [_per_frame(v, clips, frames) for v in value]
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] == clips * frames:
        return value
    if value.shape[0] != clips:
        raise ValueError(f"VideoUNet: a conditioning input has {value.shape[0]} items for {clips} clips of "
                         f"{frames} frames")
    return value.repeat_interleave(frames, dim=0)
