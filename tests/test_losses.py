"""First-stage losses: adaptive weight, disc_start switching, GAN losses, LPIPS backbone loading."""
from __future__ import annotations

import pytest
import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPSWithDiscriminator, VQLPIPSWithDiscriminator
from ldm.modules.losses.contperceptual import calculate_adaptive_weight
from ldm.modules.losses.discriminator import hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.lpips import PerceptualBackboneMissing, build_lpips


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(4)
    nll = (w @ x).pow(2).sum()
    g = -(w @ x).sum() * 3.0
    d = calculate_adaptive_weight(nll, g, w, disc_weight=0.5)
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    assert torch.allclose(d, 0.5 * gn / (gg + 1e-4))
    # clamped to [0, 1e4] before disc_weight
    tiny_g = -(w @ x).sum() * 1e-12
    assert float(calculate_adaptive_weight(nll, tiny_g, w, disc_weight=1.0)) == pytest.approx(1e4)


def test_gan_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.75))
    sp = torch.nn.functional.softplus
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(float(0.5 * (sp(-real).mean() + sp(fake).mean())))


def _kl_loss(disc_start=5):
    return LPIPSWithDiscriminator(disc_start=disc_start, perceptual_weight=0.0, disc_ndf=8, kl_weight=1e-6,
                                  disc_weight=0.5)


def test_kl_loss_before_and_after_disc_start():
    loss = _kl_loss(disc_start=5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    last = torch.nn.Parameter(torch.randn(3, 3, 3, 3))
    rec = torch.nn.functional.conv2d(x, last, padding=1)
    post = DiagonalGaussianDistribution(torch.randn(2, 8, 8, 8))
    before, log_b = loss(x, rec, post, 0, global_step=4, last_layer=last)
    expected = torch.abs(x - rec).sum() / 2 + 1e-6 * post.kl().sum() / 2  # logvar 0: nll = rec
    assert torch.allclose(before, expected, rtol=1e-5)
    assert float(log_b["train/disc_factor"]) == 0.0 and float(log_b["train/d_weight"]) == 0.0
    after, log_a = loss(x, rec, post, 0, global_step=5, last_layer=last)
    assert float(log_a["train/disc_factor"]) == 1.0 and float(log_a["train/d_weight"]) > 0
    assert torch.allclose(after, expected + log_a["train/d_weight"] * log_a["train/g_loss"], rtol=1e-5)
    d0, _ = loss(x, rec, post, 1, global_step=4)
    d1, _ = loss(x, rec, post, 1, global_step=5)
    assert float(d0) == 0.0 and float(d1) > 0.0


def test_vq_loss_terms():
    loss = VQLPIPSWithDiscriminator(disc_start=100, perceptual_weight=0.0, disc_ndf=8, codebook_weight=2.0)
    x, rec = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16) * 0.5
    total, log = loss(torch.tensor(0.25), x, rec, 0, global_step=0)
    assert float(total) == pytest.approx(0.5 + 2.0 * 0.25)


def test_training_step_respects_disc_start():
    """The discriminator is untouched before disc_start and trained after it (counted in batches)."""
    from ldm.models.autoencoder import AutoencoderKL
    import pytorch_lightning as pl
    dd = dict(double_z=True, z_channels=2, resolution=16, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    lossc = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
             "params": {"disc_start": 3, "perceptual_weight": 0.0, "disc_ndf": 8, "disc_num_layers": 2}}
    model = AutoencoderKL(dd, lossc, embed_dim=2)
    model.learning_rate = 1e-3
    snapshots = []

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(pl_module.loss.discriminator.main[0].weight.detach().clone())

    data = [{"image": torch.rand(16, 16, 3) * 2 - 1} for _ in range(12)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Snap()], limit_val_batches=0)
    trainer.fit(model, loader)
    init = snapshots[0]
    assert torch.equal(snapshots[2], init)  # batches 0..2: no discriminator step
    assert not torch.equal(snapshots[3], init)  # batch 3 = disc_start: trained
    assert model.batches_seen == 6


def test_lpips_backbone_missing_stops_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torch.hub
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(PerceptualBackboneMissing) as e:
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and "perceptual_backbone: random" in msg and str(tmp_path) in msg


def test_lpips_backbone_from_configured_path(tmp_path):
    import torchvision
    vgg = torchvision.models.vgg16()
    torch.save(vgg.state_dict(), tmp_path / "vgg.pth")
    lp = build_lpips("vgg", "pretrained", tmp_path / "vgg.pth")
    assert torch.equal(lp.net.slice1[0].weight, vgg.features[0].weight)
    assert torch.equal(getattr(lp.net.slice5, "28").weight, vgg.features[28].weight)
    assert not any(p.requires_grad for p in lp.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(lp(x, x).abs().max()) < 1e-6 and float(lp(x, -x).mean()) > 0


def test_lpips_random_backbone_is_explicit():
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, perceptual_backbone="random", disc_ndf=8)
    assert loss.perceptual_loss is not None
    with pytest.raises(ValueError, match="perceptual_backbone"):
        build_lpips("vgg", "imagenet")
