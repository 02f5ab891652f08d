"""PatchGAN discriminator (Isola et al. 2017, pix2pix) and the GAN losses used by the first stage."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

DiscLoss = Literal["hinge", "vanilla"]


class ActNorm(nn.Module):
    """Activation normalization with data-dependent init (Kingma & Dhariwal 2018, Glow)."""

    def __init__(self, num_features: int, logdet: bool = False, affine: bool = True, allow_reverse_init: bool = False):
        super().__init__()
        assert affine
        self.logdet, self.allow_reverse_init = logdet, allow_reverse_init
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._seen_initialized = False  # host copy of `initialized` once it is 1: later steps read no device value
        self.register_load_state_dict_post_hook(lambda module, incompatible: setattr(module, "_seen_initialized", False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
        self.loc.data.copy_(-flat.mean(1).view_as(self.loc))
        self.scale.data.copy_((1.0 / (flat.std(1) + 1e-6)).view_as(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 2
        if squeeze:
            x = x[:, :, None, None]
        if self.training and not self._seen_initialized:
            if self.initialized.item() == 0:
                self.initialize(x)
                self.initialized.fill_(1)
            self._seen_initialized = True
        h = self.scale * (x + self.loc)
        if squeeze:
            h = h.squeeze(-1).squeeze(-1)
        if self.logdet:
            logdet = torch.sum(torch.log(torch.abs(self.scale))) * x.shape[2] * x.shape[3] * torch.ones(x.shape[0]).to(x)
            return h, logdet
        return h


def weights_init(m: nn.Module) -> None:
    """DCGAN initialization: conv weights N(0, 0.02), norm weights N(1, 0.02), biases 0."""
    name = m.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: `n_layers` stride-2 4x4 convs then two stride-1 convs; one logit per overlapping patch."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = norm_layer is not nn.BatchNorm2d
        kw, padw = 4, 1
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=kw, stride=2, padding=padw, bias=use_bias),
                    norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias),
                norm_layer(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017): mean relu(1 - D(x)) + relu(1 + D(G(z))), halved."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss (Goodfellow et al. 2014) on logits, halved."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def d_loss_fn(kind: DiscLoss):
    """Discriminator loss by name."""
    if kind == "hinge":
        return hinge_d_loss
    if kind == "vanilla":
        return vanilla_d_loss
    raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got '{kind}'")


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` before `threshold` steps, then `weight` (the CompVis disc_start switch)."""
    return value if global_step < threshold else weight


class NLayerDiscriminator3D(nn.Module):
    """A patch-wise video discriminator: the PatchGAN's layers as 3-d convolutions, (3, 4, 4) kernels striding 2 in
    space and 1 in time, one logit per overlapping space-time patch of a (B, C, T, H, W) clip."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, time_kernel: int = 3):
        super().__init__()
        kw, tk = 4, time_kernel
        pad = (tk // 2, 1, 1)
        seq: list[nn.Module] = [nn.Conv3d(input_nc, ndf, kernel_size=(tk, kw, kw), stride=(1, 2, 2), padding=pad),
                                nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv3d(ndf * prev, ndf * mult, kernel_size=(tk, kw, kw), stride=(1, 2, 2), padding=pad,
                              bias=False), nn.BatchNorm3d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv3d(ndf * prev, ndf * mult, kernel_size=(tk, kw, kw), stride=1, padding=pad, bias=False),
                nn.BatchNorm3d(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv3d(ndf * mult, 1, kernel_size=(tk, kw, kw), stride=1, padding=pad)]
        self.main = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"NLayerDiscriminator3D takes clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        return self.main(x)
