"""Diffusion math and LatentDiffusion glue: schedules, targets, weighting, EMA, guidance dropout, configs."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.diffusionmodules.loss import MinSNRWeighting, vlb_weights
from ldm.core.parameterization import Parameterization
from ldm.modules.diffusionmodules.schedule import ddpm_buffers, make_beta_schedule, rescale_zero_terminal_snr
from ldm.modules.ema import LitEma
from ldm.core.spacing import compvis_ddim_timesteps
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_compvis_linear_schedule_is_scaled_linear():
    b = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    assert b.dtype == np.float64 and b[0] == pytest.approx(0.00085) and b[-1] == pytest.approx(0.012)
    assert b[500] == pytest.approx((math.sqrt(0.00085) + 500 / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2)
    assert make_beta_schedule("sqrt_linear", 10, 0.1, 0.2)[5] == pytest.approx(0.1 + 5 / 9 * 0.1)
    assert make_beta_schedule("sqrt", 10, 0.1, 0.2)[5] == pytest.approx((0.1 + 5 / 9 * 0.1) ** 0.5)
    cos = make_beta_schedule("cosine", 1000)
    ac = np.cumprod(1 - cos)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ac[499] == pytest.approx(f(500) / f(0), rel=1e-6)


def test_zero_terminal_snr():
    b = rescale_zero_terminal_snr(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    ac = np.cumprod(1 - b)
    assert ac[-1] == pytest.approx(0.0, abs=1e-12)
    assert ac[0] == pytest.approx(1 - 0.00085, rel=1e-6)


def test_buffers_names_and_values():
    bufs = ddpm_buffers(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    assert set(bufs) == {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                         "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                         "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                         "posterior_mean_coef1", "posterior_mean_coef2"}
    assert float(bufs["alphas_cumprod_prev"][0]) == 1.0 and float(bufs["posterior_variance"][0]) == 0.0


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    w = MinSNRWeighting(5.0)
    assert torch.allclose(w(None, snr, Parameterization.X0), torch.tensor([0.5, 5.0, 5.0]))
    assert torch.allclose(w(None, snr, Parameterization.EPS), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(w(None, snr, Parameterization.V), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    zero = torch.zeros(1)  # zero terminal SNR: min(SNR, gamma) / SNR -> 1, not 0 / 0
    assert float(w(None, zero, Parameterization.EPS)) == 1.0 and float(w(None, zero, Parameterization.V)) == 0.0
    bufs = ddpm_buffers(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    lw = vlb_weights("eps", bufs["betas"].double(), bufs["alphas_cumprod"].double(), bufs["posterior_variance"].double())
    assert lw[0] == lw[1] and torch.isfinite(lw).all()


def test_ema_keys_and_update():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    ema = LitEma(m, decay=0.5, use_num_upates=False)
    keys = set(ema.state_dict())
    assert {"decay", "num_updates", "0weight", "0bias"} <= keys
    with torch.no_grad():
        m[0].weight.fill_(1.0)
    before = ema.state_dict()["0weight"].clone()
    ema(m)
    assert torch.allclose(ema.state_dict()["0weight"], 0.5 * before + 0.5)
    with ema.average_parameters(m):
        assert torch.allclose(m[0].weight, 0.5 * before + 0.5)
    assert torch.all(m[0].weight == 1.0)


def test_ema_follows_moved_shadows_replaced_parameters_and_another_model():
    """The update finds its tensors anew each time: after `.to()` (new shadow buffers), a parameter replaced in its
    module (as sharding does), a copy of the model, and half-precision weights against float32 shadows."""
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    ema = LitEma(m, decay=0.5, use_num_upates=False)
    ema(m)
    ema.to(torch.float64).float()  # every shadow buffer is a new tensor now
    with torch.no_grad():
        m[0].weight.fill_(2.0)
    before = ema.state_dict()["0weight"].clone()
    ema(m)
    assert torch.allclose(ema.state_dict()["0weight"], 0.5 * before + 1.0)
    m[1].weight = torch.nn.Parameter(torch.full((1, 2), 4.0))
    before = ema.state_dict()["1weight"].clone()
    ema(m)
    assert torch.allclose(ema.state_dict()["1weight"], 0.5 * before + 2.0)
    other = copy.deepcopy(m)
    with torch.no_grad():
        other[0].bias.fill_(-6.0)
    before = ema.state_dict()["0bias"].clone()
    ema(other)
    assert torch.allclose(ema.state_dict()["0bias"], 0.5 * before - 3.0)
    half = copy.deepcopy(m).to(torch.bfloat16)
    with torch.no_grad():
        half[0].weight.fill_(8.0)
    before = ema.state_dict()["0weight"].clone()
    ema(half)
    assert ema.state_dict()["0weight"].dtype == torch.float32
    assert torch.allclose(ema.state_dict()["0weight"], 0.5 * before + 4.0)
    assert copy.deepcopy(ema)._owners is None


def tiny_ldm_config(ae_ckpt: str, **over):
    cfg = load_config(ROOT / "configs/ldm/shapes_txt2img.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = ae_ckpt
    u = cfg.model.params.unet_config.params
    u.model_channels, u.num_head_channels = 32, 16
    cfg.model.params.update(over)
    return cfg


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    from safetensors.torch import save_file
    cfg = load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml")
    ae = instantiate_from_config(cfg.model)
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_file(ae.state_dict(), str(path))
    return str(path)


@pytest.mark.minilm
def test_ldm_state_dict_prefixes_and_frozen_parts(ae_ckpt):
    model = instantiate_from_config(tiny_ldm_config(ae_ckpt).model)
    keys = list(model.state_dict())
    assert any(k.startswith("model.diffusion_model.time_embed.0.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert "model_ema.diffusion_modeltime_embed0weight" in keys and "model_ema.num_updates" in keys
    for name in ("betas", "alphas_cumprod", "posterior_mean_coef2", "scale_factor"):
        assert name in keys
    assert "logvar" not in keys and "lvlb_weights" not in keys
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
    model.train()
    assert not model.first_stage_model.training


def test_guidance_dropout_rate():
    from ldm.modules.encoders.conditioner import drop_conditions, null_input_like as null_condition_like
    torch.manual_seed(0)
    caps = ["a small red circle in the center"] * 20000
    dropped = drop_conditions(caps, 0.1, null_condition_like(caps, "caption"))
    rate = sum(c == "" for c in dropped) / len(caps)
    assert abs(rate - 0.1) < 0.01
    labels = torch.arange(20000) % 7
    dropped = drop_conditions(labels, 0.25, null_condition_like(labels, "class_label", null_label=7))
    assert abs(float((dropped == 7).float().mean()) - 0.25) < 0.01 and torch.equal(dropped[dropped != 7],
                                                                                     labels[dropped != 7])
    with pytest.raises(ValueError, match="null class"):
        null_condition_like(torch.arange(10), "class_label")


@pytest.mark.minilm
def test_ldm_training_step_and_sampling(ae_ckpt):
    from ldm.data.shapes import ShapesDataset
    model = instantiate_from_config(tiny_ldm_config(ae_ckpt, ucg_rate=0.5).model)
    ds = ShapesDataset(num_samples=8)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    model.train()
    loss, log = model.shared_step(batch)
    assert loss.requires_grad and "train/loss_simple" in log
    loss.backward()
    assert model.model.diffusion_model.out[2].weight.grad is not None
    model.eval()
    imgs = model.log_images(batch, N=2, ddim_steps=3)
    assert imgs["samples"].shape == (2, 3, 32, 32) and "samples_cfg_scale_3.00" in imgs
    assert imgs["diffusion_row"].shape[1:] == (3, 32, 32)


@pytest.mark.minilm
def test_ldm_p_losses_targets_each_parameterization(ae_ckpt):
    for p in ("eps", "x0", "v"):
        model = instantiate_from_config(tiny_ldm_config(ae_ckpt, parameterization=p).model)
        z = torch.randn(3, 4, 8, 8)
        noise = torch.randn_like(z)
        t = torch.tensor([5, 500, 995])
        seen = {}
        model.apply_model = lambda x, tt, c: seen.setdefault("x", x) * 0  # predicts zeros
        loss, log = model.p_losses(z, None, t, noise=noise)
        sa = model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s1 = model.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        assert torch.allclose(seen["x"], sa * z + s1 * noise, atol=1e-6)
        target = {"eps": noise, "x0": z, "v": sa * noise - s1 * z}[p]
        assert torch.allclose(log["train/loss_simple"], target.pow(2).mean(), rtol=1e-5)


PAPER_CONFIGS = {"cin-ldm-vq-f8", "celebahq-ldm-vq-4", "ffhq-ldm-vq-4", "lsun_bedrooms-ldm-vq-4", "lsun_churches-ldm-kl-8",
                 "txt2img-1p4B", "txt2img", "inpainting_big", "bsr_sr", "layout2img-openimages256",
                 "semantic_synthesis256"}


def shrink_ldm_config(cfg, tmp_path: Path):
    """The same architecture at tiny width: UNet, first stage and conditioner channels cut to 32 (heads kept)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    u = cfg.model.params.unet_config.params
    u.model_channels = 32
    if u.get("num_head_channels", -1) not in (-1, None):
        u.num_head_channels = 8
    if u.get("context_dim") is not None:
        u.context_dim = 32
    fs = cfg.model.params.first_stage_config.params
    fs.ddconfig.ch = 32
    if "n_embed" in fs:
        fs.n_embed = 64
    cs = cfg.model.params.cond_stage_config
    if not isinstance(cs, str):
        name = cs.target.rsplit(".", 1)[-1]
        if name == "ClassEmbedder":
            cs.params.embed_dim = 32
        elif name == "BERTEmbedder":
            cs.params.n_embed, cs.params.n_layer = 32, 1
        elif name == "FrozenCLIPEmbedder":  # a tiny local CLIP text model in place of ViT-L/14
            CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2)).save_pretrained(tmp_path / "clip")
            cs.params.version = str(tmp_path / "clip")
    return cfg


def synthetic_batch(cfg, n: int = 2) -> dict:
    """Random images at the smallest size the first stage and UNet down-sample evenly, plus the condition."""
    p = cfg.model.params
    f = 2 ** (len(p.first_stage_config.params.ddconfig.ch_mult) - 1)
    latent = 2 ** (len(p.unet_config.params.channel_mult) - 1)
    size = max(latent, 4) * f
    batch = {"image": torch.rand(n, size, size, 3) * 2 - 1}
    key = p.get("cond_stage_key", "image")
    if key == "class_label":
        batch[key] = torch.randint(0, p.cond_stage_config.params.n_classes, (n,))
    elif key == "caption":
        batch[key] = ["a photograph of a church", "a red bedroom"][:n]
    elif key == "masked_image":  # the paper's inpainting model: CompVis convention, mask in {-1, 1}
        mask = torch.zeros(n, size, size, 1)
        mask[:, : size // 2] = 1
        batch["mask"], batch[key] = mask * 2 - 1, batch["image"] * (1 - mask) - mask
    elif key == "LR_image":  # super-resolution: the low-resolution image has the latent's size
        batch[key] = torch.rand(n, size // f, size // f, 3) * 2 - 1
    elif key == "coordinates_bbox":  # layout tokens (ldm.data.layout)
        c = p.cond_stage_config.params
        batch[key] = torch.randint(0, c.vocab_size, (n, c.max_seq_len))
    elif key == "segmentation":  # one-hot label maps at image size
        c = p.cond_stage_config.params
        labels = torch.randint(0, c.in_channels, (n, size, size))
        batch[key] = torch.nn.functional.one_hot(labels, c.in_channels).float()
    return batch


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "ldm").glob("*.yaml"))
                         + [ROOT / "configs" / "scaling" / "mnist_miniature.yaml"], ids=lambda p: p.stem)
def test_ldm_configs_instantiate_and_step(path, tmp_path):
    """Every shipped LDM config builds (paper-sized ones at tiny width) and takes a training step."""
    from safetensors.torch import save_file
    cfg = load_config(path)
    if path.stem in PAPER_CONFIGS:
        cfg = shrink_ldm_config(cfg, tmp_path)
    if OmegaConf.is_missing(cfg.model.params, "ckpt_path"):  # fine-tuning recipes: from scratch here
        cfg.model.params.ckpt_path = None
    fs = cfg.model.params.first_stage_config
    if OmegaConf.is_missing(fs.params, "ckpt_path"):  # every config takes a trained first stage
        fs.params.ckpt_path = None
        save_file(instantiate_from_config(fs).state_dict(), str(tmp_path / "fs.safetensors"))
        fs.params.ckpt_path = str(tmp_path / "fs.safetensors")
    assert not OmegaConf.missing_keys(cfg.model), OmegaConf.missing_keys(cfg.model)
    model = instantiate_from_config(cfg.model)
    assert model.num_timesteps == cfg.model.params.timesteps
    if "data" not in cfg:  # a model whose data is private (semantic synthesis)
        batch = synthetic_batch(cfg)
    elif OmegaConf.missing_keys(cfg.data):  # user data: the roots must be the only unset keys
        assert {k.rsplit(".", 1)[-1] for k in OmegaConf.missing_keys(cfg.data)} == {"root"}
        batch = synthetic_batch(cfg)
    else:
        from ldm.data.local import DatasetNotFound
        from ldm.util import ConfigError
        try:
            ds = instantiate_from_config(cfg.data.params.validation)
            batch = torch.utils.data.default_collate([ds[i] for i in range(2)])
        except ConfigError as e:  # a local copy of a public dataset, absent here: the message says what to set
            assert isinstance(e.__cause__, DatasetNotFound) and "Nothing is downloaded" in str(e)
            batch = synthetic_batch(cfg)
    model.train()
    loss, _ = model.shared_step(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.parameters())


def test_paper_configs_keep_the_paper_architectures():
    """The paper family is shipped with its published shapes (checked on the config, not built at full size)."""
    shipped = {p.stem for p in (ROOT / "configs" / "ldm").glob("*.yaml")}
    assert PAPER_CONFIGS <= shipped
    cin = load_config(ROOT / "configs/ldm/cin-ldm-vq-f8.yaml").model.params
    assert cin.first_stage_config.target.endswith("VQModelInterface") and cin.first_stage_config.params.n_embed == 16384
    assert cin.cond_stage_config.target.endswith("ClassEmbedder") and cin.unet_config.params.model_channels == 256
    big = load_config(ROOT / "configs/ldm/txt2img-1p4B.yaml").model.params
    assert big.cond_stage_config.params.n_embed == 1280 and big.cond_stage_config.params.n_layer == 32
    assert big.unet_config.params.context_dim == 1280 and big.unet_config.params.model_channels == 320
    for name in ("celebahq-ldm-vq-4", "ffhq-ldm-vq-4", "lsun_bedrooms-ldm-vq-4", "lsun_churches-ldm-kl-8"):
        assert load_config(ROOT / f"configs/ldm/{name}.yaml").model.params.cond_stage_config == "__is_unconditional__"


@pytest.mark.minilm
def test_cached_latents_match_encoding_and_are_reused(ae_ckpt, tmp_path, monkeypatch):
    """CachedLatents stores the first stage's posterior moments; LatentDiffusion samples from them as after encoding."""
    import ldm.data.latents as latents
    from ldm.data.shapes import ShapesValidation
    cfg = tiny_ldm_config(ae_ckpt)
    ds_cfg = {"target": "ldm.data.shapes.ShapesValidation", "params": {"size": 32, "num_samples": 6}}
    cached = latents.CachedLatents(ds_cfg, cfg.model.params.first_stage_config, cache_dir=tmp_path, batch_size=4)
    assert len(cached) == 6 and latents.LATENT_KEY in cached[0] and "image" not in cached[0]
    assert cached[2]["caption"] == ShapesValidation(size=32, num_samples=6)[2]["caption"]
    # a second build with the same configs and checkpoint loads the file instead of encoding again
    monkeypatch.setattr(latents, "encode_dataset", lambda *a, **k: pytest.fail("re-encoded a cached dataset"))
    again = latents.CachedLatents(ds_cfg, cfg.model.params.first_stage_config, cache_dir=tmp_path)
    assert again.path == cached.path and torch.equal(again.moments, cached.moments)
    monkeypatch.undo()
    other = dict(ds_cfg, params={"size": 32, "num_samples": 5})  # another dataset: another cache file
    assert latents.CachedLatents(other, cfg.model.params.first_stage_config, cache_dir=tmp_path).path != cached.path

    model = instantiate_from_config(cfg.model)
    images = torch.utils.data.default_collate([ShapesValidation(size=32, num_samples=6)[i] for i in range(6)])
    from_cache = torch.utils.data.default_collate([cached[i] for i in range(6)])
    torch.manual_seed(0)
    z_img, c_img = model.get_input(images, "image")
    torch.manual_seed(0)
    z_cache, c_cache = model.get_input(from_cache, "image")
    assert torch.allclose(z_img, z_cache, rtol=1e-4, atol=1e-4) and torch.equal(c_img, c_cache)
    model.train()
    loss, _ = model.shared_step(from_cache)
    assert torch.isfinite(loss)
    log = model.log_images(from_cache, N=2, sample=False)
    assert log["inputs"].shape == (2, 3, 32, 32)


def test_cached_latents_refuse_an_untrained_first_stage(ae_ckpt, tmp_path):
    from ldm.data.latents import CachedLatents
    fs = OmegaConf.to_container(tiny_ldm_config(ae_ckpt).model.params.first_stage_config)
    fs["params"]["ckpt_path"] = None
    with pytest.raises(ValueError, match="ckpt_path"):
        CachedLatents({"target": "ldm.data.shapes.ShapesValidation", "params": {"num_samples": 2}}, fs, cache_dir=tmp_path)


# -- the denoiser of a model, and the training defaults ------------------------------------------------------------
def _perturbed(model, scale: float = 0.05):
    """Weights moved away from initialisation (a fresh UNet's output layer is zero: every comparison would pass)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _reference_compvis_denoiser(model, x, sigma, c):
    """k-diffusion's CompVisDenoiser(model, quantize=False), written independently: fractional t by log-sigma
    interpolation in float64, c_in = 1 / sqrt(1 + sigma^2), x0 = x - sigma * eps."""
    ac = model.alphas_cumprod.double()
    log_sigmas = (((1 - ac) / ac) ** 0.5).log().numpy()
    t = np.interp(np.log(sigma.double().numpy()), log_sigmas, np.arange(len(log_sigmas)))
    s = sigma.double().view(-1, 1, 1, 1)
    eps = model.apply_model((x.double() / (1 + s ** 2).sqrt()).float(), torch.tensor(t, dtype=torch.float32), c)
    return x.double() - s * eps.double()


@pytest.mark.minilm
def test_ldm_denoiser_equals_a_fractional_timestep_compvis_denoiser(ae_ckpt):
    """Old code told the UNet floor(t): off grid by up to a whole timestep, and t - 1 on some grid levels."""
    model = _perturbed(instantiate_from_config(tiny_ldm_config(ae_ckpt).model).eval())
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 6, 384, generator=g)
    den = model.denoiser()
    grid = den.sigmas[[21, 501, 981]]  # DDIM-50 levels
    off = torch.tensor([0.35, 2.0, 9.5])  # between grid levels (as Karras / Heun evaluate)
    for sigma in (grid, off):
        x = torch.randn(3, 4, 8, 8, generator=g) * (1 + sigma.view(-1, 1, 1, 1))
        with torch.no_grad():
            ours, ref = den(x, sigma, c=c).double(), _reference_compvis_denoiser(model, x, sigma, c)
        rel = float((ours - ref).norm() / ref.norm())
        assert rel < 1e-5, rel


@pytest.mark.minilm
def test_ldm_ddim_sends_the_exact_integer_timesteps(ae_ckpt):
    model = instantiate_from_config(tiny_ldm_config(ae_ckpt).model).eval()
    seen = []
    model.apply_model = lambda x, t, c: (seen.append(t.clone()), x * 0)[1]
    model.sample(torch.zeros(1, 6, 384), 1, steps=50, sampler="ddim", guidance_scale=1.0)
    sent = [float(t[0]) for t in seen]
    assert sent == [float(v) for v in compvis_ddim_timesteps(model.num_timesteps, 50)[::-1]]


@pytest.mark.minilm
def test_eps_with_zero_terminal_snr_builds_and_names_the_vlb_problem(ae_ckpt):
    """Old code failed at construction with a VLB message although the VLB term was off."""
    model = instantiate_from_config(tiny_ldm_config(ae_ckpt, zero_terminal_snr=True).model)
    assert float(model.alphas_cumprod[-1]) == 0.0 and not hasattr(model, "lvlb_weights")
    loss, _ = model.p_losses(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 384), torch.tensor([999, 998]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="original_elbo_weight"):
        instantiate_from_config(tiny_ldm_config(ae_ckpt, zero_terminal_snr=True, original_elbo_weight=0.1).model)


@pytest.mark.minilm
def test_v_prediction_with_zero_terminal_snr_samples_from_the_terminal_step(ae_ckpt):
    model = _perturbed(instantiate_from_config(
        tiny_ldm_config(ae_ckpt, zero_terminal_snr=True, parameterization="v").model).eval())
    seen = []
    orig = model.apply_model
    model.apply_model = lambda x, t, c: (seen.append(float(t[0])), orig(x, t, c))[1]
    z = model.sample(torch.zeros(2, 6, 384), 2, steps=10, sampler="ddim", spacing="trailing", guidance_scale=1.0)
    assert seen[0] == 999.0 and torch.isfinite(z).all()


@pytest.mark.minilm
def test_scale_by_std_measures_the_unscaled_latents(ae_ckpt):
    """Old code multiplied by the configured factor first: 0.18215 with scale_by_std ended at latent std ~5.5."""
    from ldm.data.shapes import ShapesDataset
    model = instantiate_from_config(tiny_ldm_config(ae_ckpt, scale_factor=0.18215).model)
    assert model.scale_by_std
    ds = ShapesDataset(num_samples=32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(32)])
    model.on_train_batch_start(batch, 0)
    z = model.get_input(batch, model.first_stage_key)[0]
    assert abs(float(z.std()) - 1.0) < 0.1, float(z.std())


@pytest.mark.minilm
def test_missing_ema_weights_start_from_the_loaded_weights(ae_ckpt, tmp_path, caplog):
    """Old code left model_ema random when a checkpoint had no model_ema.* keys."""
    import logging

    from safetensors.torch import save_file

    from ldm.util import load_model_from_config
    cfg = tiny_ldm_config(ae_ckpt)
    trained = _perturbed(instantiate_from_config(cfg.model))
    sd = {k: v.contiguous() for k, v in trained.state_dict().items() if not k.startswith("model_ema.")}
    save_file(sd, str(tmp_path / "no_ema.safetensors"))
    with caplog.at_level(logging.WARNING):
        model = load_model_from_config(cfg, tmp_path / "no_ema.safetensors")
    assert "no EMA weights" in caplog.text
    with model.ema_scope():
        for (name, p), q in zip(model.model.named_parameters(), trained.model.parameters()):
            assert torch.equal(p, q), name
    fresh = instantiate_from_config(cfg.model)
    fresh.init_from_ckpt(str(tmp_path / "no_ema.safetensors"))  # the CompVis ckpt_path route
    shadow = dict(fresh.model_ema.named_buffers())
    for name, p in trained.model.named_parameters():
        assert torch.equal(shadow[fresh.model_ema.m_name2s_name[name]], p), name


def test_pixel_ddpm_clips_its_x0_estimates():
    """Old code stored clip_denoised but never applied it."""
    from ldm.models.diffusion.ddpm import DDPM
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {"image_size": 8, "in_channels": 1, "out_channels": 1, "model_channels": 32,
                       "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1], "num_heads": 1}}
    ddpm = DDPM(unet, image_size=8, channels=1, parameterization="x0", use_ema=False).eval()
    ddpm.apply_model = lambda x, t, c=None: torch.full_like(x, 10.0)  # x0 estimates far outside [-1, 1]
    out = ddpm.sample(None, 2, steps=5, spacing="trailing")
    assert torch.allclose(out, torch.ones_like(out))
    ddpm.clip_denoised = False
    assert torch.allclose(ddpm.sample(None, 2, steps=5, spacing="trailing"), torch.full((2, 1, 8, 8), 10.0))


@pytest.mark.minilm
def test_raw_condition_permutes_image_like_keys_but_not_text_or_labels(ae_ckpt):
    """Old code permuted only a fixed list of image keys (CompVis permutes all but caption, bbox and class)."""
    model = instantiate_from_config(tiny_ldm_config(ae_ckpt).model)
    batch = {"depth": torch.rand(2, 8, 8), "lr": torch.rand(2, 8, 8, 3), "caption": ["a", "b"],
             "class_label": torch.tensor([1, 2])}
    for key, shape in (("depth", (2, 1, 8, 8)), ("lr", (2, 3, 8, 8))):
        model.cond_stage_key = key
        assert tuple(model.raw_condition(batch).shape) == shape
    model.cond_stage_key = "lr"
    assert torch.equal(model.raw_condition(batch), batch["lr"].permute(0, 3, 1, 2))
    model.cond_stage_key = "caption"
    assert model.raw_condition(batch) == ["a", "b"]
    model.cond_stage_key = "class_label"
    assert torch.equal(model.raw_condition(batch), batch["class_label"])
