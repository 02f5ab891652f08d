"""VQ-autoencoder loss: L1/L2 + LPIPS reconstruction, codebook loss and PatchGAN (Esser et al. 2021, VQGAN)."""
from __future__ import annotations

from typing import Optional

import torch

from ldm.modules.losses.contperceptual import GANLossMixin
from ldm.modules.losses.discriminator import hinge_d_loss, vanilla_d_loss  # noqa: F401  (CompVis names)


class VQLPIPSWithDiscriminator(GANLossMixin):
    """CompVis VQ loss: mean(rec + p) + codebook_weight * codebook loss + adaptive GAN term."""

    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixelloss_weight: float = 1.0,
                 disc_num_layers: int = 3, disc_in_channels: int = 3, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge",
                 n_classes: Optional[int] = None, perceptual_loss: str = "lpips", pixel_loss: str = "l1",
                 perceptual_net: str = "vgg", perceptual_backbone: str = "pretrained",
                 perceptual_backbone_path: Optional[str] = None, perceptual_heads_path: Optional[str] = None):
        super().__init__()
        if perceptual_loss != "lpips":
            raise ValueError(f"perceptual_loss '{perceptual_loss}' unknown: only 'lpips' is provided")
        self.codebook_weight, self.n_classes = codebook_weight, n_classes
        self._setup(disc_start, pixelloss_weight, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                    perceptual_weight, use_actnorm, disc_conditional, disc_loss, disc_ndf, perceptual_net,
                    perceptual_backbone, perceptual_backbone_path, pixel_loss, perceptual_heads_path)

    def forward(self, codebook_loss: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None, split: str = "train", predicted_indices=None,
                grad_scale: Optional[torch.Tensor] = None):
        if optimizer_idx == 1:
            return self.discriminator_terms(inputs, reconstructions, cond, global_step, split)
        if codebook_loss is None:
            codebook_loss = torch.zeros((), device=inputs.device)
        rec_loss, p_loss = self.rec_terms(inputs, reconstructions)
        nll_loss = torch.mean(rec_loss)
        g_loss, d_weight, disc_factor = self.generator_terms(nll_loss, reconstructions, cond, global_step, last_layer,
                                                             grad_scale)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        log = {f"{split}/total_loss": loss.clone().detach().mean(), f"{split}/quant_loss": codebook_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(), f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/p_loss": p_loss.detach().mean(), f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor), f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log
