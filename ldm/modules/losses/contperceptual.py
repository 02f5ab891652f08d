"""KL-autoencoder loss: L1 + LPIPS reconstruction with learned log-variance, KL term and PatchGAN."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ldm.modules.losses.discriminator import (NLayerDiscriminator, NLayerDiscriminator3D, adopt_weight, d_loss_fn,
                                             weights_init)
from ldm.modules.losses.lpips import build_lpips


def calculate_adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              disc_weight: float, eps: float = 1e-4, max_weight: float = 1e4,
                              grad_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Adaptive GAN weight (Esser et al. 2021, VQGAN eq. 7): ||grad nll|| / (||grad g|| + eps) at the last layer.

    `grad_scale`: the loss scale of float16 mixed precision. Both gradients are taken of the scaled losses
    (float16 back-propagation underflows otherwise) and eps is scaled with them, so the ratio is unchanged.
    """
    scale = grad_scale if grad_scale is not None else 1.0
    nll_grads = torch.autograd.grad(nll_loss * scale, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss * scale, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads.float()) / (torch.norm(g_grads.float()) + eps * scale)
    return torch.clamp(d_weight, 0.0, max_weight).detach() * disc_weight


class GANLossMixin(nn.Module):
    """Shared pieces of the first-stage losses: perceptual net, discriminator and the two loss branches."""

    def _setup(self, disc_start: int, pixelloss_weight: float, disc_num_layers: int, disc_in_channels: int,
               disc_factor: float, disc_weight: float, perceptual_weight: float, use_actnorm: bool,
               disc_conditional: bool, disc_loss: str, disc_ndf: int, perceptual_net: str,
               perceptual_backbone: str, perceptual_backbone_path: Optional[str], pixel_loss: str = "l1",
               perceptual_heads_path: Optional[str] = None) -> None:
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got '{pixel_loss}'")
        self.pixel_loss = pixel_loss
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        # Built only when it is used: a zero weight needs no backbone weights on disk.
        self.perceptual_loss = (build_lpips(perceptual_net, perceptual_backbone, perceptual_backbone_path,
                                            perceptual_heads_path)
                                if perceptual_weight > 0 else None)
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm, ndf=disc_ndf).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = d_loss_fn(disc_loss)
        self.disc_factor, self.discriminator_weight = disc_factor, disc_weight
        self.disc_conditional = disc_conditional

    def rec_terms(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel |x - x_rec| (or its square) + perceptual_weight * LPIPS (one value per image, broadcast)."""
        diff = inputs.contiguous() - reconstructions.contiguous()
        rec = (diff.abs() if self.pixel_loss == "l1" else diff.pow(2)) * self.pixel_weight
        p = torch.zeros((), device=inputs.device)
        if self.perceptual_loss is not None:
            p = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec = rec + self.perceptual_weight * p
        return rec, p

    def disc_active(self, global_step: int) -> bool:
        """Whether the discriminator is trained/used at this step (disc_factor after disc_start)."""
        return adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start) > 0

    def _logits(self, x: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        if cond is None:
            assert not self.disc_conditional, "disc_conditional=True needs a condition"
            return self.discriminator(x.contiguous())
        assert self.disc_conditional
        return self.discriminator(torch.cat((x.contiguous(), cond), dim=1))

    def generator_terms(self, nll_loss: torch.Tensor, reconstructions: torch.Tensor, cond, global_step: int,
                        last_layer: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(g_loss, adaptive d_weight, disc_factor) for the autoencoder update (`grad_scale`: fp16 loss scale)."""
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if disc_factor == 0.0:
            zero = torch.zeros((), device=reconstructions.device)
            return zero, zero, 0.0
        g_loss = -torch.mean(self._logits(reconstructions, cond))
        if self.training and last_layer is not None:
            d_weight = calculate_adaptive_weight(nll_loss, g_loss, last_layer, self.discriminator_weight,
                                                 grad_scale=grad_scale)
        else:
            d_weight = torch.zeros((), device=reconstructions.device)
        return g_loss, d_weight, disc_factor

    def discriminator_terms(self, inputs: torch.Tensor, reconstructions: torch.Tensor, cond, global_step: int,
                            split: str) -> tuple[torch.Tensor, dict]:
        """Discriminator loss on real inputs vs detached reconstructions."""
        logits_real = self._logits(inputs.detach(), cond)
        logits_fake = self._logits(reconstructions.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log


class LPIPSWithDiscriminator(GANLossMixin):
    """CompVis KL-autoencoder loss: NLL of (L1 + LPIPS) under a learned scalar log-variance + KL + GAN.

    `pixel_loss: l2` (not in CompVis) squares the pixel term: on flat-colour data its gradient grows
    with the error, where L1's is constant, which trains much faster (benchmarks/RESULTS.md).
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge",
                 disc_ndf: int = 64, perceptual_net: str = "vgg", perceptual_backbone: str = "pretrained",
                 perceptual_backbone_path: Optional[str] = None, pixel_loss: str = "l1",
                 perceptual_heads_path: Optional[str] = None):
        super().__init__()
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self._setup(disc_start, pixelloss_weight, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                    perceptual_weight, use_actnorm, disc_conditional, disc_loss, disc_ndf, perceptual_net,
                    perceptual_backbone, perceptual_backbone_path, pixel_loss, perceptual_heads_path)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors, optimizer_idx: int,
                global_step: int, last_layer: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                split: str = "train", weights: Optional[torch.Tensor] = None,
                grad_scale: Optional[torch.Tensor] = None):
        if optimizer_idx == 1:
            return self.discriminator_terms(inputs, reconstructions, cond, global_step, split)
        rec_loss, p_loss = self.rec_terms(inputs, reconstructions)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        g_loss, d_weight, disc_factor = self.generator_terms(nll_loss, reconstructions, cond, global_step, last_layer,
                                                             grad_scale)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {f"{split}/total_loss": loss.clone().detach().mean(), f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach().mean(), f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(), f"{split}/p_loss": p_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(), f"{split}/disc_factor": torch.tensor(disc_factor),
               f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log


class DummyLoss(nn.Module):
    """The CompVis placeholder loss of a frozen first stage (`lossconfig` of inference configs): no parameters, no use."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        raise RuntimeError("DummyLoss is a placeholder for a frozen first stage; configure a real lossconfig to train "
                           "the autoencoder")


class VideoLPIPSWithDiscriminator(LPIPSWithDiscriminator):
    """The KL-autoencoder loss on clips (Blattmann et al. 2023, sec. 3.1.1): per-frame reconstruction and LPIPS, KL,
    and a patch-wise video discriminator of 3-d convolutions (NLayerDiscriminator3D) that sees whole clips."""

    def __init__(self, *args, disc_time_kernel: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        if self.disc_conditional:
            raise ValueError("VideoLPIPSWithDiscriminator: disc_conditional is not provided for clips")
        first = self.discriminator.main[0]
        layers = sum(isinstance(m, nn.Conv2d) for m in self.discriminator.modules()) - 2
        self.discriminator = NLayerDiscriminator3D(input_nc=first.in_channels, ndf=first.out_channels,
                                                   n_layers=layers, time_kernel=disc_time_kernel).apply(weights_init)
        self.frames: Optional[int] = None  # frames per clip of the (b t) batch being scored, set by forward

    def _logits(self, x: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        if self.frames is None:
            raise ValueError("VideoLPIPSWithDiscriminator: call it with timesteps (frames per clip)")
        b = x.shape[0] // self.frames
        return self.discriminator(x.contiguous().reshape(b, self.frames, *x.shape[1:]).transpose(1, 2))

    def forward(self, *args, timesteps: Optional[int] = None, **kwargs):
        self.frames = timesteps
        return super().forward(*args, **kwargs)
