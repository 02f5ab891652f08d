"""Convolutional autoencoder Encoder/Decoder of the LDM first stage (CompVis layout, VQGAN-style)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import GroupNorm32
from ldm.modules.kernel_backend import use_cpu_kernels

# CompVis constants: GroupNorm(32 groups, eps 1e-6) everywhere in the first stage.
DEFAULT_NORM_GROUPS = 32
NORM_EPS = 1e-6


def Normalize(in_channels: int, num_groups: int = DEFAULT_NORM_GROUPS) -> nn.GroupNorm:
    """GroupNorm as used by the CompVis autoencoder (eps 1e-6, affine), computed in float32."""
    return GroupNorm32(num_groups=min(num_groups, in_channels), num_channels=in_channels, eps=NORM_EPS, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU."""
    return F.silu(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Asymmetric pad (0,1,0,1) then stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm-swish-conv twice, optional time embedding, 1x1/3x3 shortcut."""

    norm_silu_pairs = (("norm1", "act1"), ("norm2", "act2"))  # one fused op each (ldm.modules.kernel_backend)

    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int = 512, norm_groups: int = DEFAULT_NORM_GROUPS):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1, self.act1 = Normalize(in_channels, norm_groups), nn.SiLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2, self.act2 = Normalize(out_channels, norm_groups), nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (computed with SDPA)."""

    def __init__(self, in_channels: int, norm_groups: int = DEFAULT_NORM_GROUPS):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels, norm_groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        # (B, 1, N, C) rows with unit stride in C: the layout the fused CUDA attention kernels accept
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(2, 3).contiguous() for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        out = out.transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla", norm_groups: int = DEFAULT_NORM_GROUPS) -> nn.Module:
    """Attention block by CompVis name: 'vanilla' or 'none'."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels, norm_groups)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type '{attn_type}' unknown: use 'vanilla' or 'none'")


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn`, and a `downsample`/`upsample` (named as CompVis)."""


def _check_resolution(resolution: int, ch_mult: Sequence[int]) -> None:
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not divisible by the down-sampling factor {factor} "
                         f"of ch_mult {list(ch_mult)}")


class Encoder(nn.Module):
    """Image -> latent moments: conv_in, `down` levels, mid (res-attn-res), norm, conv_out."""

    norm_silu_pairs = (("norm_out", "act_out"),)

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side: each level but the last halves the resolution."""
        return 2 ** (self.num_resolutions - 1)

    def __init__(self, *, ch: int, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", norm_groups: int = DEFAULT_NORM_GROUPS,
                 **ignore_kwargs):
        super().__init__()
        if use_linear_attn:
            attn_type = "none"
        ch_mult = tuple(ch_mult)
        _check_resolution(resolution, ch_mult)
        self.ch, self.temb_ch = ch, 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0,
                                               dropout=dropout, norm_groups=norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(make_attn(block_in, attn_type, norm_groups))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0,
                                       dropout=dropout, norm_groups=norm_groups)
        self.mid.attn_1 = make_attn(block_in, attn_type, norm_groups)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0,
                                       dropout=dropout, norm_groups=norm_groups)
        self.norm_out, self.act_out = Normalize(block_in, norm_groups), nn.SiLU()
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)
        use_cpu_kernels(self)  # the fused CPU kernels' modules, as LDM_FUSED_CPU_OPS says

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(self.act_out(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image: conv_in, mid, `up` levels (indexed from full resolution, run lowest first), conv_out.

    Built from two factories, `make_resblock` and `make_conv_out`, so that a temporal decoder is this one with other
    blocks (ldm.modules.temporal_ae.VideoDecoder); layers declaring `block_inputs` get those of the call's inputs
    (a temporal decoder's `timesteps`), which a decoder refuses unless it lists them in `extra_inputs`.
    """

    norm_silu_pairs = (("norm_out", "act_out"),)
    extra_inputs: tuple[str, ...] = ()

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, use_linear_attn: bool = False, attn_type: str = "vanilla",
                 norm_groups: int = DEFAULT_NORM_GROUPS, **ignore_kwargs):
        super().__init__()
        if use_linear_attn:
            attn_type = "none"
        ch_mult = tuple(ch_mult)
        _check_resolution(resolution, ch_mult)
        self.ch, self.temb_ch = ch, 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        self.dropout, self.norm_groups = dropout, norm_groups
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = self.make_resblock(block_in, block_in)
        self.mid.attn_1 = make_attn(block_in, attn_type, norm_groups)
        self.mid.block_2 = self.make_resblock(block_in, block_in)
        levels = []
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(self.make_resblock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(make_attn(block_in, attn_type, norm_groups))
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.act_out = Normalize(block_in, norm_groups), nn.SiLU()
        self.conv_out = self.make_conv_out(block_in, out_ch)
        use_cpu_kernels(self)  # the fused CPU kernels' modules, as LDM_FUSED_CPU_OPS says

    # -- block factories: a subclass overrides one to change every block of its kind ------------------------
    def make_resblock(self, ch_in: int, ch_out: int) -> nn.Module:
        """A residual block of the decoder (mid and up levels)."""
        return ResnetBlock(in_channels=ch_in, out_channels=ch_out, temb_channels=0, dropout=self.dropout,
                           norm_groups=self.norm_groups)

    def make_conv_out(self, ch_in: int, ch_out: int) -> nn.Module:
        """The last convolution, to image channels."""
        return nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor, **inputs: Any) -> torch.Tensor:
        unknown = sorted(set(inputs) - set(self.extra_inputs))
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward: unknown input{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(unknown)}" + (f"; it takes {', '.join(self.extra_inputs)}"
                                                       if self.extra_inputs else "; it takes only the latent"))
        self.last_z_shape = z.shape
        h = self.conv_in(z)
        h = _call(self.mid.block_1, h, inputs)
        h = _call(self.mid.block_2, self.mid.attn_1(h), inputs)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = _call(block, h, inputs)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = _call(self.conv_out, self.act_out(self.norm_out(h)), inputs)
        return torch.tanh(h) if self.tanh_out else h


def _call(layer: nn.Module, h: torch.Tensor, inputs: dict) -> torch.Tensor:
    """`layer(h)` with the inputs it declares in `block_inputs`."""
    names = getattr(layer, "block_inputs", ())
    return layer(h, **{n: inputs[n] for n in names if n in inputs}) if names else layer(h)
