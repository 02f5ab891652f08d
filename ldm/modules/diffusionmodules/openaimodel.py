"""Time-conditional UNet with SpatialTransformer cross-attention (CompVis `UNetModel`, SD v1/v2 layout)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from ldm.modules.attention import SpatialTransformer, zero_module
from ldm.util import report_once
from ldm.modules.diffusionmodules.guidance_embedding import GuidanceEmbedding
from ldm.modules.diffusionmodules.util import (UNET_NORM_GROUPS, avg_pool_nd, conv_nd, linear, normalization,
                                               run_norm_silu, timestep_embedding, to_channels_last,
                                               upsample_nearest)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes the embedding to TimestepBlocks, the context to SpatialTransformers, and the size
    an upsampling layer must reach (`output_size`, for inputs whose side is not a multiple of the UNet's factor)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, output_size=output_size)
            elif isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size=output_size)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 (or to `output_size`, the skip's size, when a side was odd) then an optional 3x3 conv (key `conv`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        self.use_conv, self.dims = use_conv, dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        doubled = [2 * n for n in x.shape[-2:]]
        if output_size is None or list(output_size)[-2:] == doubled:
            x = upsample_nearest(x, self.dims)
        else:
            size = (x.shape[2], *list(output_size)[-2:]) if self.dims == 3 else tuple(output_size)[-2:]
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (padding 1) or average pooling (key `op`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with timestep embedding: in_layers, emb_layers, out_layers (zero conv), skip_connection."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False,
                 norm_groups: int = UNET_NORM_GROUPS):
        super().__init__()
        self.channels, self.emb_channels = channels, emb_channels
        self.out_channels = out_channels or channels
        self.use_checkpoint, self.use_scale_shift_norm = use_checkpoint, use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels, norm_groups), nn.SiLU(),
                                       conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels, norm_groups), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return grad_checkpoint(self._forward, x, emb, output_size, use_reentrant=False)
        return self._forward(x, emb, output_size)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        if self.updown:
            upd = {"output_size": output_size} if isinstance(self.h_upd, Upsample) else {}
            h = self.in_layers[-1](self.h_upd(run_norm_silu(self.in_layers, x, stop=-1), **upd))
            x = self.x_upd(x, **upd)
        else:
            h = run_norm_silu(self.in_layers, x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = run_norm_silu(self.out_layers, h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions with a 1-d conv qkv (keys norm, qkv, proj_out); legacy head order."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_checkpoint: bool = False,
                 use_new_attention_order: bool = False, norm_groups: int = UNET_NORM_GROUPS):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint, self.new_order = use_checkpoint, use_new_attention_order
        self.norm = normalization(channels, norm_groups)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        xf = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(xf))
        h, d, n = self.num_heads, c // self.num_heads, xf.shape[-1]
        # channels of qkv: new order q | k | v, each split into heads; legacy order per head q | k | v
        grouped = qkv.reshape(b, 3, h, d, n) if self.new_order else qkv.reshape(b, h, 3, d, n).transpose(1, 2)
        # one copy to contiguous (B, H, N, D) rows per q, k, v: the fused CUDA kernels refuse strided ones
        q, k, v = grouped.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, n)
        return (xf + self.proj_out(out)).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The CompVis/SD UNet: time embedding, input/middle/output blocks of ResBlocks and attention, out conv."""

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: Union[int, Sequence[int]], attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: Optional[Union[int, str]] = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: Union[int, Sequence[int]] = 1, context_dim: Optional[Union[int, Sequence[int]]] = None,
                 n_embed: Optional[int] = None, legacy: bool = True, disable_self_attentions: Optional[Sequence[bool]] = None,
                 num_attention_blocks: Optional[Sequence[int]] = None, disable_middle_self_attn: bool = False,
                 use_linear_in_transformer: bool = False, adm_in_channels: Optional[int] = None,
                 norm_groups: int = UNET_NORM_GROUPS, guidance_embed: bool = False, channels_last: bool = True):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the conditioning's feature size)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is set but use_spatial_transformer is false: cross-attention needs it")
        if isinstance(context_dim, ListConfig):
            context_dim = list(context_dim)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if n_embed is not None:
            raise NotImplementedError("n_embed (codebook id prediction) is not provided")
        if num_attention_blocks is not None:
            raise NotImplementedError("num_attention_blocks is not provided")
        channel_mult = list(channel_mult)
        nrb = [num_res_blocks] * len(channel_mult) if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(nrb) != len(channel_mult):
            raise ValueError("num_res_blocks must be an int or one entry per channel_mult level")
        depth = ([transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int)
                 else list(transformer_depth))
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_res_blocks = model_channels, nrb
        self.attention_resolutions, self.dropout = list(attention_resolutions), dropout
        self.channel_mult, self.conv_resample = channel_mult, conv_resample
        self.num_classes, self.use_checkpoint = num_classes, use_checkpoint
        if use_fp16:  # CompVis cast the UNet to float16 here; precision is a run-time choice in this framework
            report_once("UNetModel: use_fp16 is accepted and ignored; choose the precision at run time "
                        "(trainer precision, or --precision for sampling)")
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.predict_codebook_ids = False
        ted = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, ted), nn.SiLU(), linear(ted, ted))
        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = nn.Embedding(num_classes, ted)
            elif num_classes == "continuous":
                self.label_emb = nn.Linear(1, ted)
            elif num_classes == "sequential":
                if adm_in_channels is None:
                    raise ValueError("num_classes 'sequential' needs adm_in_channels")
                self.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, ted), nn.SiLU(), linear(ted, ted)))
            else:
                raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")
        # guidance_embed: the classifier-free guidance scale is an input (guidance-distilled students, ldm.distillation)
        self.guidance_embed = GuidanceEmbedding(model_channels, ted) if guidance_embed else None

        def heads_for(ch: int) -> tuple[int, int]:
            if num_head_channels == -1:
                nh, dh = num_heads, ch // num_heads
            else:
                nh, dh = ch // num_head_channels, num_head_channels
            if legacy:
                dh = ch // nh if use_spatial_transformer else num_head_channels
            return nh, dh

        def attention(ch: int, level: int, nh_override: Optional[int] = None, self_attn_off: bool = False) -> nn.Module:
            nh, dh = heads_for(ch)
            if use_spatial_transformer:
                return SpatialTransformer(ch, nh, dh, depth=depth[level], context_dim=context_dim,
                                          disable_self_attn=self_attn_off, use_linear=use_linear_in_transformer,
                                          use_checkpoint=use_checkpoint, norm_groups=norm_groups)
            return AttentionBlock(ch, num_heads=nh_override or nh, num_head_channels=dh if num_head_channels != -1 else -1,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order,
                                  norm_groups=norm_groups)

        def resblock(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, ted, dropout, out_channels=ch_out, dims=dims, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, norm_groups=norm_groups, **kw)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for nr in range(nrb[level]):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    off = disable_self_attentions[level] if disable_self_attentions is not None else False
                    layers.append(attention(ch, level, self_attn_off=off))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (resblock(ch, ch, down=True) if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), attention(ch, len(channel_mult) - 1, self_attn_off=disable_middle_self_attn),
            resblock(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(nrb[level] + 1):
                ich = chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    off = disable_self_attentions[level] if disable_self_attentions is not None else False
                    layers.append(attention(ch, level, nh_override=num_heads_upsample if num_heads_upsample > 0 else None,
                                            self_attn_off=off))
                if level and i == nrb[level]:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch, norm_groups), nn.SiLU(),
                                 zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))
        # channels_last: conv weights, and so every activation, in channels-last memory (the state dict is unchanged)
        if channels_last:
            to_channels_last(self, dims)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, which inputs are cast to and the output comes in."""
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, guidance: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y must be given if and only if the model is class-conditional (num_classes set)")
        if (guidance is not None) != (self.guidance_embed is not None):
            raise ValueError("guidance (the guidance scale as an input) must be given if and only if the UNet embeds it "
                             "(unet_config.params.guidance_embed: true)")
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        # inputs follow the weights' dtype (fp32, bf16 or fp16); the output stays in it
        dtype = self.dtype
        x = x.to(dtype)
        if isinstance(context, torch.Tensor):
            context = context.to(dtype)
        elif isinstance(context, (list, tuple)):
            context = [c.to(dtype) if isinstance(c, torch.Tensor) else c for c in context]
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y.to(dtype) if y.is_floating_point() else y)
        if self.guidance_embed is not None:
            guidance = torch.as_tensor(guidance, device=x.device)
            emb = emb + self.guidance_embed(guidance.expand(x.shape[0]) if guidance.dim() == 0 else guidance, dtype)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            # an upsampling block ends at the size of the skip it meets next (odd sides: not simply x2)
            h = module(h, emb, context, output_size=hs[-1].shape[2:] if hs else None)
        return run_norm_silu(self.out, h).contiguous()  # the usual layout out, whatever the memory format inside
