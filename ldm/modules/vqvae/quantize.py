"""Vector quantizer (van den Oord et al. 2017, VQ-VAE) with index remapping, EMA codebook and dead-code restart."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from einops import rearrange
from torch import nn


def _code_counts(idx: torch.Tensor, n_codes: int) -> torch.Tensor:
    """How often each code index occurs, as float32 (a scatter-add: no host sync, unlike bincount on CUDA)."""
    return torch.zeros(n_codes, device=idx.device).index_add_(0, idx.flatten(), torch.ones(idx.numel(), device=idx.device))


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantization with straight-through gradients.

    Loss: ||sg[z_q] - z||^2 + beta * ||z_q - sg[z]||^2 with `legacy=True` (beta on the codebook
    term, as CompVis/taming trained), or beta on the commitment term with `legacy=False`. With `ema_decay` the codebook follows exponential moving
    averages of assigned encoder outputs (VQ-VAE-2, Razavi et al. 2019) instead of gradients, and
    only the commitment term is returned. With `restart_dead_codes`, codes unused for
    `dead_code_steps` training steps are re-drawn from the current batch's encoder outputs.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap: Optional[str] = None,
                 unknown_index: str | int = "random", sane_index_shape: bool = False, legacy: bool = True,
                 ema_decay: Optional[float] = None, ema_eps: float = 1e-5, restart_dead_codes: bool = False,
                 dead_code_steps: int = 100):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        if remap is not None:
            self.register_buffer("used", torch.tensor(np.load(remap)))
            self.re_embed = int(self.used.shape[0])
            self.unknown_index = unknown_index
            if self.unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape
        self.ema_decay, self.ema_eps = ema_decay, ema_eps
        if ema_decay is not None:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(n_e))
            self.register_buffer("ema_embed_sum", self.embedding.weight.data.clone())
        self.restart_dead_codes, self.dead_code_steps = restart_dead_codes, dead_code_steps
        if restart_dead_codes:
            self.register_buffer("steps_since_used", torch.zeros(n_e, dtype=torch.long), persistent=False)

    # -- index remapping (CompVis/taming semantics) --------------------------------------------
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape, device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:  # extra token
            inds[inds >= self.used.shape[0]] = 0
        back = torch.gather(used[None, :][inds.shape[0] * [0], :], 1, inds)
        return back.reshape(ishape)

    # -- quantization --------------------------------------------------------------------------
    def _nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code, from squared distances in float32 (half precision and autocast off here:
        rounding would pick other codes)."""
        with torch.autocast(z_flat.device.type, enabled=False):
            z, w = z_flat.float(), self.embedding.weight.float()
            d = (z.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1)[None] - 2.0 * z @ w.t())
        return d.argmin(dim=1)

    @torch.no_grad()
    def _ema_update(self, z_flat: torch.Tensor, idx: torch.Tensor) -> None:
        z_flat = z_flat.float()
        counts = _code_counts(idx, self.n_e)
        sums = torch.zeros(self.n_e, z_flat.shape[1], device=z_flat.device).index_add_(0, idx, z_flat)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.ema_cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_embed_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + self.ema_eps) / (n + self.n_e * self.ema_eps) * n  # Laplace smoothing
        self.embedding.weight.data.copy_(self.ema_embed_sum / size[:, None])

    @torch.no_grad()
    def _restart_dead(self, z_flat: torch.Tensor, idx: torch.Tensor) -> None:
        used = _code_counts(idx, self.n_e) > 0  # (an index_put of a Python True would copy it to the GPU: a sync)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            u = used.long()
            torch.distributed.all_reduce(u)
            used = u > 0
        self.steps_since_used.add_(1).masked_fill_(used, 0)
        # every code gets a candidate; only dead ones take it (masked writes: no host sync to count them)
        dead = (self.steps_since_used >= self.dead_code_steps)[:, None]
        pick = torch.randint(0, z_flat.shape[0], (self.n_e,), device=z_flat.device)
        new = z_flat[pick].to(self.embedding.weight.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(new, src=0)
        self.embedding.weight.data.copy_(torch.where(dead, new, self.embedding.weight.data))
        if self.ema_decay is not None:
            self.ema_embed_sum.copy_(torch.where(dead, new.to(self.ema_embed_sum.dtype), self.ema_embed_sum))
            self.ema_cluster_size.masked_fill_(dead[:, 0], 1.0)
        self.steps_since_used.masked_fill_(dead[:, 0], 0)

    def forward(self, z: torch.Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        """Quantize z (B, C, H, W) -> (z_q, loss, (perplexity, min_encodings, indices))."""
        z = rearrange(z, "b c h w -> b h w c").contiguous()
        z_flat = z.reshape(-1, self.e_dim)
        idx = self._nearest(z_flat)
        if self.training and self.restart_dead_codes:
            self._restart_dead(z_flat.detach(), idx)
            idx = self._nearest(z_flat)
        if self.training and self.ema_decay is not None:
            self._ema_update(z_flat.detach(), idx)
        z_q = self.embedding(idx).view(z.shape)
        if self.ema_decay is not None:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
        elif self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        z_q = rearrange(z_q, "b h w c -> b c h w").contiguous()
        counts = _code_counts(idx, self.n_e)
        probs = counts / counts.sum()
        perplexity = torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))
        min_encoding_indices = idx
        if self.remap is not None:
            min_encoding_indices = self.remap_to_used(idx.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (perplexity, None, min_encoding_indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[tuple] = None) -> torch.Tensor:
        """Codebook vectors for `indices`; with `shape` (B, H, W, C) returned as (B, C, H, W)."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices.reshape(-1))
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


# CompVis configs and code import it under this name.
VectorQuantizer2 = VectorQuantizer
