"""First stage: config instantiation, reference state-dict layout, posterior math, quantizer behaviour."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModel, VQModelInterface
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.vqvae.quantize import VectorQuantizer
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ROOT / "tests" / "data" / "sd_state_dict_layouts.json"
AE_CONFIGS = sorted((ROOT / "configs" / "autoencoder").glob("*.yaml"))


def _ref(section: str) -> dict:
    """{key: shape} of a published SD section (tests/data)."""
    return json.loads(LAYOUTS.read_text())[section]["shapes"]


def tiny(cfg):
    """Shrink a shipped config's model to tiny width, keeping its structure."""
    cfg = cfg.copy()
    dd = cfg.model.params.ddconfig
    dd.ch = 8
    dd.resolution = 2 ** len(dd.ch_mult) * 4
    dd.attn_resolutions = [r * dd.resolution // 256 for r in dd.attn_resolutions]
    lp = cfg.model.params.lossconfig.params
    lp.perceptual_backbone = "random"
    lp.disc_ndf = 8
    if "n_embed" in cfg.model.params:
        cfg.model.params.n_embed = 64
    return cfg


def test_all_autoencoder_configs_are_shipped():
    names = {p.stem for p in AE_CONFIGS}
    for f in ("kl_f4", "kl_f8", "kl_f16", "kl_f32", "vq_f4", "vq_f8", "vq_f16"):
        assert f"autoencoder_{f}" in names
    assert {"shapes_kl_f4", "mnist_kl_f4"} <= names


@pytest.mark.parametrize("path", AE_CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates_and_runs(path):
    cfg = load_config(path)
    if cfg.model.params.ddconfig.ch > 32:
        cfg = tiny(cfg)
    model = instantiate_from_config(cfg.model)
    dd = cfg.model.params.ddconfig
    f = 2 ** (len(dd.ch_mult) - 1)
    x = torch.rand(2, dd.in_channels, dd.resolution, dd.resolution) * 2 - 1
    with torch.no_grad():
        rec, aux = model(x)
    assert rec.shape == x.shape
    z = model.encode(x)
    z = z.mode() if isinstance(z, DiagonalGaussianDistribution) else z[0]
    assert z.shape == (2, cfg.model.params.embed_dim, dd.resolution // f, dd.resolution // f)
    # data config: user-data configs demand their root, embedded ones build
    missing = OmegaConf.missing_keys(cfg)
    if not missing:
        ds = instantiate_from_config(cfg.data.params.validation)
        assert len(ds) > 0 and ds[0]["image"].shape[-1] == dd.in_channels
    else:
        assert all(k.endswith(".root") for k in missing)


def test_kl_f8_layout_matches_stable_diffusion():
    ref = _ref("sd_v1_autoencoder_kl_f8")
    cfg = load_config(ROOT / "configs/autoencoder/autoencoder_kl_f8.yaml")
    model = AutoencoderKL(ddconfig=cfg.model.params.ddconfig, lossconfig=None, embed_dim=4)
    sd = model.state_dict()
    assert set(sd) == set(ref), (set(sd) ^ set(ref))
    for k, shape in ref.items():
        assert list(sd[k].shape) == shape, k
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters())
    assert round(enc / 1e6, 2) == 34.16 and round(dec / 1e6, 2) == 49.49
    # a checkpoint with this layout loads strictly, under the LatentDiffusion prefix too
    ckpt = {"state_dict": {f"first_stage_model.{k}": torch.zeros(s) for k, s in ref.items()}}
    from ldm.checkpoint import load_state_dict_checked
    load_state_dict_checked(model, ckpt, strict=True, prefix="first_stage_model.")
    assert float(model.quant_conv.weight.abs().sum()) == 0.0


def test_compvis_training_checkpoint_with_loss_keys_loads_strict():
    """A CompVis AE checkpoint also carries `loss.*` (logvar, LPIPS, discriminator)."""
    cfg = tiny(load_config(ROOT / "configs/autoencoder/autoencoder_kl_f4.yaml"))
    cfg.model.params.lossconfig.params.perceptual_weight = 1.0
    model = instantiate_from_config(cfg.model)
    keys = set(model.state_dict())
    for k in ("loss.logvar", "loss.perceptual_loss.scaling_layer.shift", "loss.perceptual_loss.net.slice1.0.weight",
              "loss.perceptual_loss.lin0.model.1.weight", "loss.discriminator.main.0.weight",
              "loss.discriminator.main.3.running_mean"):
        assert k in keys, k
    vq = instantiate_from_config(tiny(load_config(ROOT / "configs/autoencoder/autoencoder_vq_f8.yaml")).model)
    assert "quantize.embedding.weight" in vq.state_dict()


def test_downsample_pads_right_bottom_only():
    from ldm.modules.diffusionmodules.model import Downsample
    d = Downsample(1, True)
    torch.nn.init.zeros_(d.conv.bias)
    torch.nn.init.zeros_(d.conv.weight)
    d.conv.weight.data[0, 0, 0, 0] = 1.0  # picks the top-left tap of each 3x3 window
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = d(x)
    assert y.shape == (1, 1, 2, 2)
    assert torch.equal(y[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))


def test_diagonal_gaussian_matches_torch():
    p = torch.randn(3, 8, 4, 4)
    post = DiagonalGaussianDistribution(p)
    mean, logvar = p[:, :4], p[:, 4:]
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl = torch.distributions.kl_divergence(ref, std_normal).sum((1, 2, 3))
    assert torch.allclose(post.kl(), kl, atol=1e-4)
    s = torch.randn_like(mean)
    assert torch.allclose(post.nll(s), -ref.log_prob(s).sum((1, 2, 3)), atol=1e-3)
    clamped = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, 100.0)], 1))
    assert float(clamped.logvar.max()) == 20.0


def test_quantizer_nearest_code_and_straight_through():
    q = VectorQuantizer(16, 4, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    zq, loss, (perp, _, idx) = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expect = torch.cdist(flat, q.embedding.weight).argmin(1)
    assert torch.equal(idx, expect)
    assert torch.allclose(zq, q.embedding.weight[expect].reshape(2, 3, 3, 4).permute(0, 3, 1, 2))
    zq.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # straight-through
    assert 1.0 <= float(perp) <= 16.0
    # legacy loss: ||sg[zq] - z||^2 + beta ||zq - sg[z]||^2 (equal values, so 1.25 * mse)
    mse = torch.mean((zq.detach() - z.detach()) ** 2)
    assert torch.allclose(loss, 1.25 * mse, atol=1e-6)


def test_quantizer_remap_roundtrip(tmp_path):
    import numpy as np
    used = np.array([3, 5, 7, 11])
    np.save(tmp_path / "used.npy", used)
    q = VectorQuantizer(16, 2, remap=str(tmp_path / "used.npy"), unknown_index="extra", sane_index_shape=True)
    with torch.no_grad():
        q.embedding.weight.zero_()
        for i, u in enumerate(used):
            q.embedding.weight[u] = torch.tensor([float(i + 1), 0.0])
    z = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): hits codes 3 and 7
    _, _, (_, _, ind) = q(z)
    assert ind.tolist() == [[[0, 2]]]
    back = q.get_codebook_entry(ind.reshape(1, -1), shape=(1, 1, 2, 2))
    assert torch.allclose(back, z)


def test_quantizer_ema_moves_codes_to_cluster_means():
    q = VectorQuantizer(2, 2, ema_decay=0.5)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.ema_embed_sum.copy_(q.embedding.weight)
        q.ema_cluster_size.fill_(1.0)
    z = torch.tensor([1.0, 1.0, 9.0, 9.0]).reshape(1, 1, 2, 2).repeat(1, 2, 1, 1)  # points (1,1) x2, (9,9) x2
    q.train()
    for _ in range(30):
        q(z)
    assert torch.allclose(q.embedding.weight, torch.tensor([[1.0, 1.0], [9.0, 9.0]]), atol=1e-2)
    assert not q.embedding.weight.requires_grad


def test_quantizer_restarts_dead_codes():
    q = VectorQuantizer(8, 2, restart_dead_codes=True, dead_code_steps=2)
    with torch.no_grad():
        q.embedding.weight.fill_(100.0)
        q.embedding.weight[0] = 0.0
    z = torch.randn(4, 2, 4, 4) * 0.1
    q.train()
    for _ in range(3):
        q(z)
    assert float(q.embedding.weight.abs().max()) < 10.0  # dead codes re-drawn from encoder outputs


def test_vq_interface_and_identity():
    cfg = tiny(load_config(ROOT / "configs/autoencoder/autoencoder_vq_f4.yaml"))
    params = OmegaConf.to_container(cfg.model.params)
    params.pop("monitor")
    m = VQModelInterface(**params)
    x = torch.rand(1, 3, 16, 16)
    h = m.encode(x)
    assert h.shape[1] == params["embed_dim"] and m.decode(h).shape == x.shape
    ident = IdentityFirstStage(vq_interface=True)
    assert ident.encode(x) is x and ident.quantize(x)[0] is x
    assert isinstance(m, VQModel)


def test_vq_batch_resize_range_resizes_the_input_and_trains():
    """Old code resized only the reconstruction's input, then compared it with the original-size batch (crash)."""
    cfg = tiny(load_config(ROOT / "configs/autoencoder/autoencoder_vq_f4.yaml"))
    res = cfg.model.params.ddconfig.resolution
    cfg.model.params.batch_resize_range = [res - 16, res]
    model = instantiate_from_config(cfg.model)
    batch = {"image": torch.rand(2, res, res, 3) * 2 - 1}
    assert model.get_input(batch).shape[-1] == res  # the first batches use the largest size (CompVis)
    model.batches_seen = 10
    sizes = {model.get_input(batch).shape[-1] for _ in range(40)}
    assert sizes == {res - 16, res}
    x = model.get_input(batch)
    rec, aux = model._forward_train(x)
    loss, _ = model._loss_call(x, rec, aux, 0, "train", 0)
    assert rec.shape == x.shape and torch.isfinite(loss)
