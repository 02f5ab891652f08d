"""The autoencoder's temporal decoder (Blattmann et al. 2023, "Align your Latents", sec. 3.1.1): the image decoder
with a 3-d residual block over time after each res-block and a (3, 1, 1) convolution after the output convolution;
frames are encoded one by one by the unchanged encoder. Key layout of sgm's `VideoDecoder` (time_mode conv-only,
as Stable Video Diffusion's): `time_stack`, `mix_factor`, `conv_out.time_mix_conv`."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, ResnetBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock
from ldm.modules.diffusionmodules.temporal_mix import MergeStrategy

TIME_MODES = ("conv-only", "only-last-conv")  # sgm's modes with temporal convolutions and no temporal attention


def _padding(kernel: Union[int, Sequence[int]]) -> Union[int, tuple[int, ...]]:
    return kernel // 2 if isinstance(kernel, int) else tuple(k // 2 for k in kernel)


class VideoResnetBlock(ResnetBlock):
    """A ResnetBlock on each frame, then a ResBlock over (b, c, t, h, w) (`time_stack`); out = alpha * temporal +
    (1 - alpha) * spatial with alpha = `mix_factor` (fixed) or sigmoid of it (learned), as sgm's decoder merges."""

    block_inputs = ("timesteps",)

    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0,
                 video_kernel_size: Union[int, Sequence[int]] = 3, alpha: float = 0.0,
                 merge_strategy: str = MergeStrategy.LEARNED.value, norm_groups: int = 32):
        super().__init__(in_channels=in_channels, out_channels=out_channels, temb_channels=0, dropout=dropout,
                         norm_groups=norm_groups)
        strategy = MergeStrategy.named(merge_strategy, "VideoResnetBlock")
        if strategy is MergeStrategy.LEARNED_WITH_IMAGES:
            raise ValueError("VideoResnetBlock: merge_strategy learned_with_images is the UNet's; the decoder takes "
                             "fixed or learned")
        self.merge_strategy = strategy
        self.time_stack = ResBlock(self.out_channels, 0, dropout, out_channels=self.out_channels, dims=3,
                                   kernel_size=video_kernel_size, skip_t_emb=True, norm_groups=norm_groups)
        factor = torch.tensor([float(alpha)])
        if strategy is MergeStrategy.FIXED:
            self.register_buffer("mix_factor", factor)
        else:
            self.mix_factor = nn.Parameter(factor)

    def alpha(self) -> torch.Tensor:
        return self.mix_factor if self.merge_strategy is MergeStrategy.FIXED else torch.sigmoid(self.mix_factor)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None,
                timesteps: Optional[int] = None) -> torch.Tensor:
        x = super().forward(x, temb)
        if timesteps is None:  # single images (sgm's skip_video)
            return x
        spatial = rearrange(x, "(b t) c h w -> b c t h w", t=timesteps)
        temporal = self.time_stack(spatial, None)
        alpha = self.alpha().to(x.dtype)
        return rearrange(alpha * temporal + (1.0 - alpha) * spatial, "b c t h w -> (b t) c h w")


class AE3DConv(nn.Conv2d):
    """A 2-d convolution on each frame, then a 3-d one over time (`time_mix_conv`)."""

    block_inputs = ("timesteps",)

    def __init__(self, in_channels: int, out_channels: int, video_kernel_size: Union[int, Sequence[int]] = 3,
                 **conv: int):
        super().__init__(in_channels, out_channels, **conv)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, kernel_size=video_kernel_size,
                                       padding=_padding(video_kernel_size))

    def forward(self, x: torch.Tensor, timesteps: Optional[int] = None) -> torch.Tensor:
        x = super().forward(x)
        if timesteps is None:
            return x
        x = self.time_mix_conv(rearrange(x, "(b t) c h w -> b c t h w", t=timesteps))
        return rearrange(x, "b c t h w -> (b t) c h w")

    @torch.no_grad()
    def as_identity_in_time(self) -> None:
        """time_mix_conv := the identity (centre tap the unit matrix, the rest and the bias zero)."""
        w = self.time_mix_conv.weight
        w.zero_()
        centre = tuple(k // 2 for k in w.shape[2:])
        w[(slice(None), slice(None)) + centre] = torch.eye(w.shape[0], dtype=w.dtype)
        self.time_mix_conv.bias.zero_()


class VideoDecoder(Decoder):
    """Decoder whose res-blocks are VideoResnetBlocks and whose conv_out is an AE3DConv (time_mode conv-only), or only
    the conv_out (only-last-conv). `forward(z, timesteps=T)` decodes (b t) latents as clips of T frames; without
    `timesteps` it decodes single images with the spatial layers alone."""

    extra_inputs = ("timesteps",)

    def __init__(self, *args, video_kernel_size: Union[int, Sequence[int]] = 3, alpha: float = 0.0,
                 merge_strategy: str = MergeStrategy.LEARNED.value, time_mode: str = "conv-only", **kwargs):
        if time_mode not in TIME_MODES:
            raise NotImplementedError(f"VideoDecoder: time_mode '{time_mode}' is not provided (temporal attention in "
                                      f"the decoder); use one of {list(TIME_MODES)}")
        self.video_kernel_size = list(video_kernel_size) if not isinstance(video_kernel_size, int) else video_kernel_size
        self.alpha, self.merge_strategy, self.time_mode = alpha, merge_strategy, time_mode
        super().__init__(*args, **kwargs)

    def make_resblock(self, ch_in: int, ch_out: int) -> nn.Module:
        if self.time_mode == "only-last-conv":
            return super().make_resblock(ch_in, ch_out)
        return VideoResnetBlock(in_channels=ch_in, out_channels=ch_out, dropout=self.dropout,
                                video_kernel_size=self.video_kernel_size, alpha=self.alpha,
                                merge_strategy=self.merge_strategy, norm_groups=self.norm_groups)

    def make_conv_out(self, ch_in: int, ch_out: int) -> nn.Module:
        return AE3DConv(ch_in, ch_out, video_kernel_size=self.video_kernel_size, kernel_size=3, stride=1, padding=1)

    def is_temporal_key(self, key: str) -> bool:
        """Whether a state-dict key (relative to the decoder or with a prefix) is a temporal layer's."""
        parts = key.split(".")
        return "time_stack" in parts or "time_mix_conv" in parts or parts[-1] == "mix_factor"

    @torch.no_grad()
    def start_as_image_decoder(self) -> "VideoDecoder":
        """Every temporal branch returns its input (the time_stack's zero output conv, conv_out's identity in time), so
        each frame decodes as the image decoder decodes it (up to rounding of the alpha merge)."""
        for m in self.modules():
            if isinstance(m, VideoResnetBlock):
                for p in m.time_stack.out_layers[-1].parameters():
                    p.zero_()
            elif isinstance(m, AE3DConv):
                m.as_identity_in_time()
        return self
