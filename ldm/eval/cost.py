"""Cost accounting: parameters and FLOPs of one UNet forward (torch's flop counter), and normalized sampling cost.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as 2 FLOPs; matmuls,
convolutions and attention are counted, element-wise ops are not). Counting runs on the "meta" device by
default, so a 5B-parameter UNet is measured without allocating its weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldm.errors import InputError
from ldm.sampling.registry import EVALS_PER_STEP
from ldm.util import instantiate_from_config

# The SD v1 text context the thesis' UNets were measured with: 77 CLIP tokens.
DEFAULT_CONTEXT_TOKENS = 77


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (all, trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def build_unet_on_meta(unet_config: Mapping[str, Any]) -> nn.Module:
    """The UNet of a `target`/`params` config, built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return instantiate_from_config(unet_config)


def unet_inputs(unet: nn.Module, latent_shape: Sequence[int], batch_size: int = 1,
                context_tokens: int = DEFAULT_CONTEXT_TOKENS, device: Optional[torch.device] = None) -> dict:
    """Example inputs for one forward of `unet`: latents (B, C, H, W), timesteps, and the context / class it reads."""
    if device is None:
        device = next(unet.parameters()).device
    kw: dict[str, Any] = {"x": torch.zeros(batch_size, *latent_shape, device=device),
                          "timesteps": torch.zeros(batch_size, device=device)}
    context_dim = getattr(unet, "context_dim", None)
    if context_dim is None:  # not every UNet keeps it: read it from the first cross-attention's key projection
        keys = [m for n, m in unet.named_modules() if n.endswith("attn2.to_k")]
        context_dim = keys[0].in_features if keys else None
    if context_dim is not None:
        kw["context"] = torch.zeros(batch_size, context_tokens, int(context_dim), device=device)
    num_classes = getattr(unet, "num_classes", None)
    if isinstance(num_classes, int):
        kw["y"] = torch.zeros(batch_size, dtype=torch.long, device=device)
    elif num_classes is not None:  # "continuous" (1 value) or "sequential" (adm_in_channels values) embeddings
        kw["y"] = torch.zeros(batch_size, unet.label_emb[0][0].in_features if num_classes == "sequential" else 1,
                              device=device)
    if getattr(unet, "guidance_embed", None) is not None:  # a guidance-distilled student: the scale is an input
        kw["guidance"] = torch.ones(batch_size, device=device)
    return kw


@torch.no_grad()
def unet_forward_flops(unet: nn.Module, latent_shape: Sequence[int], *, batch_size: int = 1,
                       context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> int:
    """FLOPs of one UNet forward on a batch of `batch_size` latents of `latent_shape` (C, H, W)."""
    kw = unet_inputs(unet, latent_shape, batch_size, context_tokens)
    with FlopCounterMode(display=False) as counter:
        unet(kw.pop("x"), kw.pop("timesteps"), **kw)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class UNetCost:
    """Parameters and FLOPs of one forward of a UNet, per sample."""
    params: int
    flops: int

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def unet_cost(unet_config: Mapping[str, Any], latent_shape: Sequence[int],
              context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> UNetCost:
    """Parameters and per-sample forward FLOPs of the UNet a config describes (measured on the meta device)."""
    unet = build_unet_on_meta(unet_config)
    return UNetCost(count_parameters(unet), unet_forward_flops(unet, latent_shape, context_tokens=context_tokens))


def forwards_per_sample(sampler: str, steps: int, guidance_scale: float, guidance_doubles: bool = True) -> int:
    """UNet forwards one sample takes: steps x evaluations per step, doubled by classifier-free guidance.

    Guidance with scale 1 is the conditional model alone (the sampler skips the unconditional branch).
    `guidance_doubles` False: the model takes the scale as an input (a guidance-distilled student), one forward.
    """
    if sampler not in EVALS_PER_STEP:
        raise KeyError(f"unknown sampler '{sampler}'; known: {', '.join(sorted(EVALS_PER_STEP))}")
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    return steps * EVALS_PER_STEP[sampler] * (2 if guidance_scale != 1.0 and guidance_doubles else 1)


def sampling_cost(flops_per_forward: int, sampler: str, steps: int, guidance_scale: float,
                  reference_flops: Optional[int] = None, guidance_doubles: bool = True) -> float:
    """Normalized sampling cost (thesis' x-axis): forwards per sample x FLOPs relative to a reference model.

    With `reference_flops` None the cost is in FLOPs per sample; otherwise it is relative cost x forwards,
    i.e. the number of reference-model forwards the same compute buys.
    """
    total = forwards_per_sample(sampler, steps, guidance_scale, guidance_doubles) * flops_per_forward
    return float(total) if reference_flops is None else total / reference_flops
