"""Time-conditional UNet with SpatialTransformer cross-attention (CompVis `UNetModel`, SD v1/v2 layout)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from ldm.modules.attention import SpatialTransformer, zero_module
from ldm.config_keys import report_no_effect
from ldm.modules.diffusionmodules.guidance_embedding import GuidanceEmbedding
from ldm.modules.diffusionmodules.util import (UNET_NORM_GROUPS, avg_pool_nd, conv_nd, linear, normalization,
                                               timestep_embedding, to_channels_last, upsample_nearest)
from ldm.modules.kernel_backend import use_cpu_kernels


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    block_inputs: tuple[str, ...] = ("emb",)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that gives each layer the inputs its `block_inputs` names, as keywords: the timestep embedding
    (`emb`), the cross-attention `context`, the size an upsampling layer must reach (`output_size`, for inputs whose
    side is not a multiple of the UNet's factor) and any input a UNet subclass adds (`num_video_frames`); a layer that
    declares none (a plain convolution) gets x alone."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                output_size: Optional[Sequence[int]] = None, **inputs: Any) -> torch.Tensor:
        given = {"emb": emb, "context": context, "output_size": output_size, **inputs}
        for layer in self:
            names = getattr(layer, "block_inputs", ())
            x = layer(x, **{n: given[n] for n in names if n in given}) if names else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 (or to `output_size`, the skip's size, when a side was odd) then an optional 3x3 conv (key `conv`)."""

    block_inputs = ("output_size",)

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

    block_inputs = ("emb", "output_size")

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False,
                 norm_groups: int = UNET_NORM_GROUPS, kernel_size: Union[int, Sequence[int]] = 3,
                 exchange_temb_dims: bool = False, skip_t_emb: bool = False):
        super().__init__()
        if skip_t_emb and use_scale_shift_norm:
            raise ValueError("ResBlock: skip_t_emb (no timestep embedding) leaves nothing to scale and shift with")
        self.skip_t_emb = skip_t_emb  # no emb_layers: a block that takes no embedding (a temporal decoder's)
        self.channels, self.emb_channels = channels, emb_channels
        self.out_channels = out_channels or channels
        self.use_checkpoint, self.use_scale_shift_norm = use_checkpoint, use_scale_shift_norm
        # exchange_temb_dims: the embedding comes per frame (b, t, c) for a (b, c, t, h, w) input (temporal blocks)
        self.exchange_temb_dims = exchange_temb_dims
        if isinstance(kernel_size, int):
            padding: Union[int, tuple[int, ...]] = kernel_size // 2
        else:
            kernel_size = tuple(kernel_size)
            padding = tuple(k // 2 for k in kernel_size)
        self.in_layers = nn.Sequential(normalization(channels, norm_groups), nn.SiLU(),
                                       conv_nd(dims, channels, self.out_channels, kernel_size, padding=padding))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        if not skip_t_emb:
            self.emb_layers = nn.Sequential(
                nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels, norm_groups), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(conv_nd(dims, self.out_channels, self.out_channels, kernel_size,
                                                            padding=padding)))
        # scale-shift: out_layers[0] runs alone, the SiLU after the scale and shift (no fused norm + SiLU there)
        self.out_layers.norm_runs_alone = use_scale_shift_norm
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, kernel_size, padding=padding)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return grad_checkpoint(self._forward, x, emb, output_size, use_reentrant=False)
        return self._forward(x, emb, output_size)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        if self.updown:
            upd = {"output_size": output_size} if isinstance(self.h_upd, Upsample) else {}
            h = self.in_layers[-1](self.h_upd(self.in_layers[:-1](x), **upd))
            x = self.x_upd(x, **upd)
        else:
            h = self.in_layers(x)
        if self.skip_t_emb:
            return self.skip_connection(x) + self.out_layers(h)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.exchange_temb_dims:  # (b, t, c, 1, 1) -> (b, c, t, 1, 1)
            emb_out = emb_out.movedim(1, 2)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
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
            report_no_effect("UNetModel", ["use_fp16"])
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
        # what the block factories read (plain attributes: the state dict is the CompVis one)
        self.dims, self.emb_channels, self.norm_groups = dims, ted, norm_groups
        self.use_scale_shift_norm, self.resblock_updown = use_scale_shift_norm, resblock_updown
        self.use_spatial_transformer, self.context_dim, self.transformer_depth = use_spatial_transformer, context_dim, depth
        self.use_linear_in_transformer, self.legacy = use_linear_in_transformer, legacy
        self.use_new_attention_order, self.num_heads_upsample = use_new_attention_order, num_heads_upsample
        self.disable_self_attentions = disable_self_attentions
        self.build_blocks(disable_middle_self_attn)
        # channels_last: conv weights, and so every activation, in channels-last memory (the state dict is unchanged)
        if channels_last:
            to_channels_last(self, dims)
        use_cpu_kernels(self)  # the fused CPU kernels' modules, as LDM_ATTENTION_BACKEND / LDM_FUSED_CPU_OPS say

    # -- block factories: a subclass overrides one to change every block of its kind ------------------------
    def heads_for(self, ch: int) -> tuple[int, int]:
        """(heads, head width) of an attention layer over `ch` channels (CompVis' `legacy` rule included)."""
        if self.num_head_channels == -1:
            nh, dh = self.num_heads, ch // self.num_heads
        else:
            nh, dh = ch // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dh = ch // nh if self.use_spatial_transformer else self.num_head_channels
        return nh, dh

    def make_resblock(self, ch_in: int, ch_out: int, level: int, **kw: Any) -> nn.Module:
        """The residual block at `level` (`up` / `down`: the resampling variant)."""
        return ResBlock(ch_in, self.emb_channels, self.dropout, out_channels=ch_out, dims=self.dims,
                        use_checkpoint=self.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm,
                        norm_groups=self.norm_groups, **kw)

    def make_attention(self, ch: int, level: int, self_attn_off: bool = False,
                       num_heads: Optional[int] = None) -> nn.Module:
        """The attention layer at `level`: a SpatialTransformer (cross-attention) or a self-attention block."""
        nh, dh = self.heads_for(ch)
        if self.use_spatial_transformer:
            return SpatialTransformer(ch, nh, dh, depth=self.transformer_depth[level], context_dim=self.context_dim,
                                      disable_self_attn=self_attn_off, use_linear=self.use_linear_in_transformer,
                                      use_checkpoint=self.use_checkpoint, norm_groups=self.norm_groups)
        return AttentionBlock(ch, num_heads=num_heads or nh, num_head_channels=dh if self.num_head_channels != -1 else -1,
                              use_checkpoint=self.use_checkpoint, use_new_attention_order=self.use_new_attention_order,
                              norm_groups=self.norm_groups)

    def make_downsample(self, ch: int, level: int) -> nn.Module:
        """The downsampling layer after `level`."""
        if self.resblock_updown:
            return self.make_resblock(ch, ch, level, down=True)
        return Downsample(ch, self.conv_resample, dims=self.dims, out_channels=ch)

    def make_upsample(self, ch: int, level: int) -> nn.Module:
        """The upsampling layer that ends `level` of the decoder."""
        if self.resblock_updown:
            return self.make_resblock(ch, ch, level, up=True)
        return Upsample(ch, self.conv_resample, dims=self.dims, out_channels=ch)

    def make_block(self, layers: Sequence[nn.Module], part: str, level: int) -> TimestepEmbedSequential:
        """One block of `part` ('input', 'middle' or 'output') at `level` from its layers."""
        return TimestepEmbedSequential(*layers)

    def _self_attn_off(self, level: int) -> bool:
        return self.disable_self_attentions[level] if self.disable_self_attentions is not None else False

    def block_units(self) -> list[nn.Module]:
        """The blocks in call order: input blocks, middle block, output blocks (the units FSDP gathers one at a
        time; a subclass with other blocks lists them here)."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    def build_blocks(self, disable_middle_self_attn: bool = False) -> None:
        """input_blocks, middle_block, output_blocks and out, from the factories above (CompVis key layout)."""
        mc, dims, nrb = self.model_channels, self.dims, self.num_res_blocks
        self.input_blocks = nn.ModuleList([
            self.make_block([conv_nd(dims, self.in_channels, mc, 3, padding=1)], "input", 0)])
        chans = [mc]
        ch, ds = mc, 1
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(nrb[level]):
                layers: list[nn.Module] = [self.make_resblock(ch, mult * mc, level)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(self.make_attention(ch, level, self_attn_off=self._self_attn_off(level)))
                self.input_blocks.append(self.make_block(layers, "input", level))
                chans.append(ch)
            if level != last:
                self.input_blocks.append(self.make_block([self.make_downsample(ch, level)], "input", level))
                chans.append(ch)
                ds *= 2
        self.middle_block = self.make_block(
            [self.make_resblock(ch, ch, last), self.make_attention(ch, last, self_attn_off=disable_middle_self_attn),
             self.make_resblock(ch, ch, last)], "middle", last)
        self.output_blocks = nn.ModuleList([])
        heads_up = self.num_heads_upsample if self.num_heads_upsample > 0 else None
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(nrb[level] + 1):
                ich = chans.pop()
                layers = [self.make_resblock(ch + ich, mc * mult, level)]
                ch = mc * mult
                if ds in self.attention_resolutions:
                    layers.append(self.make_attention(ch, level, self_attn_off=self._self_attn_off(level),
                                                      num_heads=heads_up))
                if level and i == nrb[level]:
                    layers.append(self.make_upsample(ch, level))
                    ds //= 2
                self.output_blocks.append(self.make_block(layers, "output", level))
        self.out = nn.Sequential(normalization(ch, self.norm_groups), nn.SiLU(),
                                 zero_module(conv_nd(dims, mc, self.out_channels, 3, padding=1)))

    # inputs beyond (x, timesteps, context, y, guidance) that this UNet takes and passes to every block (a video
    # UNet: num_video_frames); any other keyword is refused by name
    extra_inputs: tuple[str, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, which inputs are cast to and the output comes in."""
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, guidance: Optional[torch.Tensor] = None, **inputs: Any) -> torch.Tensor:
        unknown = sorted(set(inputs) - set(self.extra_inputs))
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward: unknown input{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(unknown)}; it takes x, timesteps, context, y, guidance"
                            + "".join(f", {n}" for n in self.extra_inputs))
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
            h = module(h, emb, context, **inputs)
            hs.append(h)
        h = self.middle_block(h, emb, context, **inputs)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            # an upsampling block ends at the size of the skip it meets next (odd sides: not simply x2)
            h = module(h, emb, context, output_size=hs[-1].shape[2:] if hs else None, **inputs)
        return self.out(h).contiguous()  # the usual layout out, whatever the memory format inside
