"""Cross-attention and SpatialTransformer (Rombach et al. 2022, sec. 3.3; SD v1/v2 key layout)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from ldm.modules.diffusionmodules.util import GroupNorm32

# SpatialTransformer's input GroupNorm (CompVis): 32 groups, eps 1e-6.
TRANSFORMER_NORM_EPS = 1e-6
FF_MULT = 4


class GeluGate(nn.Module):
    """GELU-gated linear unit's gating (Shazeer 2020): a * GELU(g) for h = [a | g] halves of the last dim (erf GELU)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, g = h.chunk(2, dim=-1)
        return a * F.gelu(g)


class Attend(nn.Module):
    """softmax(q k^T / sqrt(d)) v over (B, H, N, D) heads by torch's scaled_dot_product_attention; `mask` True where a
    key may be attended."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): value * GELU(gate) from one projection to 2 x dim_out."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
        self.gate = GeluGate()  # no weights; `ldm.modules.kernel_backend` swaps in the fused CPU kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.proj(x))


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU (or Linear + GELU) to mult x dim, dropout, Linear back (keys net.0, net.2)."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = FF_MULT, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        dim_out = dim_out or dim
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention softmax(q k^T / sqrt(d)) v; keys/values from `context` when given.

    Computed by `attend`: torch's scaled_dot_product_attention, or where `ldm.modules.kernel_backend` swapped it in
    when the network was built, the fused small-head CPU kernel (default 'auto': where timed faster).
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = dim_head * heads
        context_dim = context_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.attend = Attend()  # no weights

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], h, d).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], h, d).transpose(1, 2)
        attn_mask = None
        if mask is not None:  # (b, m) True where the context token may be attended
            attn_mask = mask.view(b, 1, 1, -1).bool()
        out = self.attend(q, k, v, attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention (attn1), cross-attention (attn2), GEGLU feed-forward (ff)."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: Optional[int] = None,
                 gated_ff: bool = True, checkpoint: bool = False, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads,
                                    dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return grad_checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` (output layers start as the identity of the residual)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, proj_in (1x1 conv or Linear), blocks, zero proj_out."""

    block_inputs = ("context",)  # what a UNet block passes it (ldm.modules.diffusionmodules.openaimodel)
    norm_silu_pairs = (("norm", None),)  # a norm with no SiLU after it, for ldm.modules.kernel_backend

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Optional[Union[int, Sequence[int]]] = None, disable_self_attn: bool = False,
                 use_linear: bool = False, use_checkpoint: bool = False, norm_groups: int = 32):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        elif context_dim is None:
            context_dim = [None] * depth
        self.in_channels = in_channels
        inner = n_heads * d_head
        self.norm = GroupNorm32(norm_groups, in_channels, eps=TRANSFORMER_NORM_EPS, affine=True)
        self.use_linear = use_linear
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, n_heads, d_head, dropout=dropout, context_dim=context_dim[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)])
        self.proj_out = zero_module(nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1))

    def tokens_in(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, h w, inner): norm, then proj_in (a 1x1 conv before the flattening, or a Linear after)."""
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        return self.proj_in(x) if self.use_linear else x

    def tokens_out(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(b, h w, inner) -> (b, c, h, w) through proj_out, the inverse arrangement of `tokens_in`."""
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w)
        return x if self.use_linear else self.proj_out(x)

    def forward(self, x: torch.Tensor, context: Optional[Union[torch.Tensor, list]] = None) -> torch.Tensor:
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        h, w = x.shape[-2:]
        tokens = self.tokens_in(x)
        for i, block in enumerate(self.transformer_blocks):
            tokens = block(tokens, context=context[i])
        return self.tokens_out(tokens, h, w) + x
