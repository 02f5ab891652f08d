"""Temporal transformers after each spatial one (Blattmann et al. 2023, "Align your Latents", sec. 3.1; the layout and
key names of sgm's `SpatialVideoTransformer`, which Stable Video Diffusion uses)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from ldm.modules.attention import CrossAttention, FeedForward, SpatialTransformer
from ldm.modules.diffusionmodules.temporal_mix import AlphaBlender, MergeStrategy
from ldm.modules.diffusionmodules.util import MAX_PERIOD, linear, timestep_embedding

# the frame-index MLP's hidden width, in multiples of the channels (sgm: 4)
TIME_POS_EMBED_MULT = 4


class VideoTransformerBlock(nn.Module):
    """Pre-norm attention over the frames of each spatial position: optional feed-forward in (ff_in), self-attention
    (attn1), optional cross-attention to a context (attn2), feed-forward (ff); tokens arrive as (b t) s c."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: Optional[int] = None,
                 gated_ff: bool = True, checkpoint: bool = False, timesteps: Optional[int] = None,
                 ff_in: bool = False, inner_dim: Optional[int] = None, disable_self_attn: bool = False,
                 disable_temporal_crossattention: bool = False, switch_temporal_ca_to_sa: bool = False):
        super().__init__()
        self.has_ff_in = ff_in or inner_dim is not None
        inner_dim = dim if inner_dim is None else inner_dim
        if n_heads * d_head != inner_dim:
            raise ValueError(f"VideoTransformerBlock: n_heads * d_head = {n_heads * d_head} must equal inner_dim "
                             f"{inner_dim}")
        if disable_temporal_crossattention and switch_temporal_ca_to_sa:
            raise ValueError("VideoTransformerBlock: switch_temporal_ca_to_sa needs the temporal attn2, which "
                             "disable_temporal_crossattention removes")
        self.is_res = inner_dim == dim
        self.timesteps, self.checkpoint = timesteps, checkpoint
        if self.has_ff_in:
            self.norm_in = nn.LayerNorm(dim)
            self.ff_in = FeedForward(dim, dim_out=inner_dim, dropout=dropout, glu=gated_ff)
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(inner_dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads,
                                    dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(inner_dim, dim_out=dim, dropout=dropout, glu=gated_ff)
        self.switch_temporal_ca_to_sa = switch_temporal_ca_to_sa
        if disable_temporal_crossattention:
            self.attn2 = None
        else:
            self.norm2 = nn.LayerNorm(inner_dim)
            self.attn2 = CrossAttention(inner_dim, context_dim=None if switch_temporal_ca_to_sa else context_dim,
                                        heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1, self.norm3 = nn.LayerNorm(inner_dim), nn.LayerNorm(inner_dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                timesteps: Optional[int] = None) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return grad_checkpoint(self._forward, x, context, timesteps, use_reentrant=False)
        return self._forward(x, context, timesteps)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                 timesteps: Optional[int] = None) -> torch.Tensor:
        t = timesteps or self.timesteps
        if t is None:
            raise ValueError("VideoTransformerBlock: the number of frames is not known (give timesteps)")
        bt, s, c = x.shape
        x = rearrange(x, "(b t) s c -> (b s) t c", t=t)
        if self.has_ff_in:
            skip = x
            x = self.ff_in(self.norm_in(x))
            if self.is_res:
                x = x + skip
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context=None if self.switch_temporal_ca_to_sa else context) + x
        skip = x
        x = self.ff(self.norm3(x))
        if self.is_res:
            x = x + skip
        return rearrange(x, "(b s) t c -> (b t) s c", s=s, t=t)


class SpatialVideoTransformer(SpatialTransformer):
    """A SpatialTransformer whose every block is followed by a VideoTransformerBlock over the frames (with a
    sinusoidal frame-index embedding through a small MLP added to its input), the two merged by an AlphaBlender."""

    block_inputs = ("context", "time_context", "num_video_frames", "image_only_indicator")

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 use_linear: bool = False, context_dim: Optional[Union[int, Sequence[int]]] = None,
                 use_spatial_context: bool = False, timesteps: Optional[int] = None,
                 merge_strategy: str = MergeStrategy.FIXED.value, merge_factor: float = 0.5,
                 time_context_dim: Optional[int] = None, ff_in: bool = False, checkpoint: bool = False,
                 time_depth: int = 1, disable_self_attn: bool = False, disable_temporal_crossattention: bool = False,
                 max_time_embed_period: int = MAX_PERIOD, norm_groups: int = 32):
        super().__init__(in_channels, n_heads, d_head, depth=depth, dropout=dropout, context_dim=context_dim,
                         disable_self_attn=disable_self_attn, use_linear=use_linear, use_checkpoint=checkpoint,
                         norm_groups=norm_groups)
        inner = n_heads * d_head
        if inner != in_channels:  # the frame embedding (in_channels wide) is added to the inner-width tokens
            raise ValueError(f"SpatialVideoTransformer: n_heads * d_head = {inner} must equal in_channels "
                             f"{in_channels} (the frame-index embedding is added to the tokens)")
        if time_depth != 1:
            raise NotImplementedError("SpatialVideoTransformer: time_depth other than 1 (one temporal block per "
                                      "spatial block, as sgm builds it)")
        spatial_dims = context_dim if isinstance(context_dim, (list, tuple)) else [context_dim]
        if use_spatial_context:
            time_context_dim = spatial_dims[0]
        self.use_spatial_context, self.max_time_embed_period = use_spatial_context, max_time_embed_period
        self.time_stack = nn.ModuleList([
            VideoTransformerBlock(inner, n_heads, d_head, dropout=dropout, context_dim=time_context_dim,
                                  timesteps=timesteps, checkpoint=checkpoint, ff_in=ff_in, inner_dim=inner,
                                  disable_self_attn=disable_self_attn,
                                  disable_temporal_crossattention=disable_temporal_crossattention)
            for _ in range(len(self.transformer_blocks))])
        hidden = TIME_POS_EMBED_MULT * in_channels
        self.time_pos_embed = nn.Sequential(linear(in_channels, hidden), nn.SiLU(), linear(hidden, in_channels))
        self.time_mixer = AlphaBlender(alpha=merge_factor, merge_strategy=merge_strategy)

    def temporal_output_layers(self) -> list[nn.Module]:
        """The layers whose zeroing makes every temporal branch add nothing to its input (start as the image model)."""
        layers: list[nn.Module] = [self.time_pos_embed[-1]]
        for block in self.time_stack:
            if block.has_ff_in and block.is_res:
                layers.append(block.ff_in.net[-1])
            layers.append(block.attn1.to_out[0])
            if block.attn2 is not None:
                layers.append(block.attn2.to_out[0])
            layers.append(block.ff.net[-1])
        return layers

    def forward(self, x: torch.Tensor, context: Optional[Union[torch.Tensor, list]] = None,
                time_context: Optional[torch.Tensor] = None, num_video_frames: Optional[int] = None,
                image_only_indicator: Optional[torch.Tensor] = None) -> torch.Tensor:
        if num_video_frames is None:
            raise ValueError("SpatialVideoTransformer needs num_video_frames (frames per clip of the (b t) batch)")
        t = num_video_frames
        _, _, h, w = x.shape
        spatial_context = context if isinstance(context, list) else [context] * len(self.transformer_blocks)
        if self.use_spatial_context:  # the first frame's context, for every position of its clip
            first = spatial_context[0]
            if first is None or first.dim() != 3:
                raise ValueError("SpatialVideoTransformer (use_spatial_context): context must be (b t, tokens, dim)")
            time_context = repeat(first[::t], "b ... -> (b n) ...", n=h * w)
        elif time_context is not None:  # one per clip
            time_context = repeat(time_context, "b ... -> (b n) ...", n=h * w)
            if time_context.dim() == 2:
                time_context = time_context[:, None]
        x_in = x
        x = self.tokens_in(x)
        frames = torch.arange(t, device=x.device).repeat(x.shape[0] // t)  # each item's index in its clip
        emb = self.time_pos_embed(timestep_embedding(frames, self.in_channels, max_period=self.max_time_embed_period)
                                  .to(x.dtype))[:, None]
        for i, (block, mix_block) in enumerate(zip(self.transformer_blocks, self.time_stack)):
            x = block(x, context=spatial_context[i])
            x_mix = mix_block(x + emb, context=time_context, timesteps=t)
            x = self.time_mixer(x, x_mix, image_only_indicator)
        return self.tokens_out(x, h, w) + x_in
