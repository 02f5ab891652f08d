"""Inpainting and super-resolution: masks, degradations, data, the SD2 layouts, known-region sampling, tiling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from _helpers import perturb, tiny_sd2
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]


# -- masks ------------------------------------------------------------------------------------------
def coverage(preset: str, n: int = 120, side: int = 256) -> np.ndarray:
    from ldm.data.masks import MaskGenerator
    gen = MaskGenerator(mix={preset: 1.0}, seed=3)
    return np.array([gen(i, side, side).mean() for i in range(n)])


def test_mask_presets_coverage_statistics():
    """Thin strokes cover little, thick strokes and boxes much more; every mask is binary and never empty."""
    stats = {p: coverage(p) for p in ("thin", "medium", "thick", "box")}
    means = {p: float(c.mean()) for p, c in stats.items()}
    # measured (120 masks, 256 px): thin 0.29, medium 0.37, thick 0.58, box 0.19
    assert 0.15 < means["thin"] < 0.40, means
    assert 0.25 < means["medium"] < 0.50, means
    assert 0.45 < means["thick"] < 0.72, means
    assert 0.10 < means["box"] < 0.30, means
    assert means["thin"] < means["medium"] < means["thick"]
    for c in stats.values():
        assert (c > 0).all() and (c < 1).all()


def test_mask_generator_deterministic_full_and_scaled():
    from ldm.data.masks import MaskGenerator
    gen = MaskGenerator(seed=7)
    a, b = gen(5, 64, 48), gen(5, 64, 48)
    assert a.shape == (64, 48) and a.dtype == np.float32 and set(np.unique(a)) <= {0.0, 1.0}
    assert np.array_equal(a, b)
    assert not np.array_equal(gen(5, 64, 48), gen(6, 64, 48))
    assert not np.array_equal(gen(5, 64, 48), MaskGenerator(seed=8)(5, 64, 48))
    full = MaskGenerator(p_full=0.3, seed=0)
    frac = np.mean([full(i, 16, 16).min() == 1.0 for i in range(400)])
    assert 0.22 < frac < 0.38
    # sizes scale with the image: coverage of a preset is about the same at 64 and 256 pixels
    assert abs(coverage("thick", 80, 64).mean() - coverage("thick", 80, 256).mean()) < 0.08
    with pytest.raises(ValueError, match="unknown preset"):
        MaskGenerator(mix={"huge": 1.0})
    with pytest.raises(ValueError, match="p_full"):
        MaskGenerator(p_full=1.5)


def test_masked_inputs_conventions():
    from ldm.modules.model_inputs import masked_inputs
    img = torch.full((1, 3, 4, 4), 0.5)
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :] = 1
    mask_sd, masked_sd = masked_inputs(img, m, "sd")
    assert torch.equal(mask_sd, m) and (masked_sd[..., :2, :] == 0).all() and (masked_sd[..., 2:, :] == 0.5).all()
    mask_cv, masked_cv = masked_inputs(img, m, "compvis")
    assert set(mask_cv.unique().tolist()) == {-1.0, 1.0}
    assert (masked_cv[..., :2, :] == -1).all() and (masked_cv[..., 2:, :] == 0.5).all()


def test_add_mask_transform():
    from ldm.data.laion import AddMask
    x = torch.rand(32, 32, 3) * 2 - 1
    s = AddMask(mode="512train-large", p_drop=1.0)({"jpg": x.clone(), "__key__": "a"})
    assert s["mask"].shape == (32, 32, 1) and (s["mask"] == 1).all() and (s["masked_image"] == 0).all()
    t = AddMask(mode="512train", p_drop=0.0)
    s1, s2 = t({"jpg": x.clone(), "__key__": "k1"}), t({"jpg": x.clone(), "__key__": "k1"})
    assert torch.equal(s1["mask"], s2["mask"]) and 0 < float(s1["mask"].mean()) < 1
    keep = s1["mask"] < 0.5
    assert torch.equal(s1["masked_image"][keep.expand_as(x)], x[keep.expand_as(x)])
    arr = AddMask(mode="box")({"jpg": x.numpy()})
    assert isinstance(arr["mask"], np.ndarray)
    with pytest.raises(ValueError, match="unknown mode"):
        AddMask(mode="1024train")
    with pytest.raises(KeyError, match="image_key"):
        AddMask()({"image": x})


def test_shapes_inpainting_box_covers_the_object():
    from ldm.data.inpainting import ShapesInpainting
    from ldm.data.shapes import coverage as shape_cov
    ds = ShapesInpainting(size=32, split="validation", num_samples=40, p_object=1.0)
    for i in range(40):
        item = ds[i]
        cov = shape_cov(ds.dataset.spec(i), 32)
        assert (item["mask"][..., 0][cov > 0] == 1).all()  # every object pixel is to be filled
        assert item["masked_image"].shape == (32, 32, 3) and item["mask"].mean() < 0.5
        assert np.array_equal(item["masked_image"][item["mask"][..., 0] == 0], item["image"][item["mask"][..., 0] == 0])


# -- degradations and SR data ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bsrgan", "bsrgan_light"])
def test_bsr_degradation_deterministic_ranges_and_params(name):
    from ldm.data.superres import BSR_DEGRADATIONS
    from ldm.modules.image_degradation import degrade
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    outs = [degrade(img, 4, np.random.default_rng(s), BSR_DEGRADATIONS[name]) for s in (1, 1, 2)]
    (a, pa), (b, pb), (c, _) = outs
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, c)
    ops = [p["op"] for p in pa]
    assert ops[0] in ("order", "downsample1") and ops[-1] == "jpeg" and "downsample3" in ops
    json.dumps(pa)  # loggable
    order = next(p["order"] for p in pa if p["op"] == "order")
    assert order.index(2) < order.index(3)  # the random downscale precedes the exact one, as published


def test_degradation_statistics_differ_between_variants():
    """The full pipeline degrades more than the light one: larger error against the bicubic downscale."""
    from ldm.modules.image_degradation import degradation_fn_bsr, degradation_fn_bsr_light, interpolation_downscale
    from skimage import data
    img = np.asarray(Image.fromarray(data.astronaut()).resize((128, 128), Image.BICUBIC))
    ref = interpolation_downscale(img, 4, "pil_bicubic").astype(np.float64)
    err = {}
    for name, fn in (("full", degradation_fn_bsr), ("light", degradation_fn_bsr_light)):
        err[name] = np.mean([np.abs(fn(img, sf=4, rng=np.random.default_rng(s))["image"] - ref).mean()
                             for s in range(12)])
    assert err["full"] > err["light"] > 0
    with pytest.raises(ValueError, match="unknown degradation"):
        interpolation_downscale(img, 4, "cv_magic")


def test_superres_datasets(tmp_path):
    from ldm.data.openimages import SuperresOpenImagesAdvancedTrain
    from ldm.data.superres import SkimageSR, SuperresFolder
    ds = SkimageSR(split="validation", size=32, num_samples=4, degradation="bsrgan_light")
    a, b = ds[1], ds[1]
    assert a["image"].shape == (32, 32, 3) and a["LR_image"].shape == (8, 8, 3)
    for k in ("image", "LR_image"):
        assert a[k].dtype == np.float32 and a[k].min() >= -1 and a[k].max() <= 1
        assert np.array_equal(a[k], b[k])
    assert json.loads(a["degradation"])
    for i in range(3):
        rgb = (np.random.default_rng(i).random((50 + 10 * i, 70, 3)) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(tmp_path / f"im{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    folder = SuperresFolder(tmp_path, size=16, degradation="pil_bicubic", min_crop_f=0.5, max_crop_f=1.0)
    assert len(folder) == 4
    items = [folder[i] for i in range(4)]  # the unreadable file is logged and skipped
    assert all(it["image"].shape == (16, 16, 3) and it["LR_image"].shape == (4, 4, 3) for it in items)
    with pytest.raises(FileNotFoundError, match="openimages"):
        SuperresOpenImagesAdvancedTrain(size=256, degradation="bsrgan_light")
    with pytest.raises(ValueError, match="multiple of downscale_f"):
        SuperresFolder(tmp_path, size=18)


# -- models ----------------------------------------------------------------------------------------------
def test_sd2_inpainting_layout_loads_strictly_and_widens_from_txt2img(tmp_path):
    from safetensors.torch import save_file
    from ldm.models.diffusion.ddpm import LatentInpaintDiffusion
    cfg = tiny_sd2("v2-inpainting-inference")
    model = instantiate_from_config(cfg.model)
    assert isinstance(model, LatentInpaintDiffusion)
    w = model.state_dict()["model.diffusion_model.input_blocks.0.0.weight"]
    assert w.shape[1] == 9  # 4 latent + 1 mask + 4 masked-image latent
    perturb(model)
    again = instantiate_from_config(cfg.model)
    again.load_state_dict(model.state_dict(), strict=True)
    # a text-to-image checkpoint of the same UNet (4 input channels) widened: new channels start at zero
    t2i = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    t2i.model.target = "ldm.models.diffusion.ddpm.LatentDiffusion"
    t2i.model.params.unet_config.params.in_channels = 4
    t2i.model.params.conditioning_key = "crossattn"
    txt = instantiate_from_config(t2i.model)
    perturb(txt, seed=1)
    sd = {k: v.contiguous() for k, v in txt.state_dict().items()}
    save_file(sd, str(tmp_path / "t2i.safetensors"))
    cfg.model.params.ckpt_path = str(tmp_path / "t2i.safetensors")
    wide = instantiate_from_config(cfg.model)
    w = wide.state_dict()["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(w[:, :4], sd["model.diffusion_model.input_blocks.0.0.weight"]) and (w[:, 4:] == 0).all()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 3, 16)
    extra = torch.randn(2, 5, 8, 8)
    out_wide = wide.apply_model(x, t, {"c_concat": [extra], "c_crossattn": [ctx]})
    out_txt = txt.apply_model(x, t, {"c_crossattn": [ctx]})
    assert out_txt.abs().mean() > 1e-3 and torch.allclose(out_wide, out_txt, atol=1e-5)


def test_x4_upscaler_layout_noise_level_as_class_and_loss():
    from ldm.models.diffusion.ddpm import LatentUpscaleDiffusion
    cfg = tiny_sd2("x4-upscaling")
    model = instantiate_from_config(cfg.model)
    assert isinstance(model, LatentUpscaleDiffusion)
    sd = model.state_dict()
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 7  # 4 latent + 3 low-res RGB
    assert sd["model.diffusion_model.label_emb.weight"].shape[0] == 1000  # the noise level, as a class label
    assert "low_scale_model.sqrt_alphas_cumprod" in sd and model.parameterization == "v"
    perturb(model)
    again = instantiate_from_config(cfg.model)
    again.load_state_dict(model.state_dict(), strict=True)
    batch = {"jpg": torch.rand(2, 16, 16, 3) * 2 - 1, "lr": torch.rand(2, 4, 4, 3) * 2 - 1,
             "txt": torch.randn(2, 3, 16)}
    z, c = model.get_input(batch, "jpg")
    assert c["c_concat"][0].shape == (2, 3, 4, 4) and c["c_adm"].shape == (2,) and (c["c_adm"] < 350).all()
    loss, _ = model.p_losses(z, c)
    assert torch.isfinite(loss)
    zx, level = model.low_scale_conditioning(batch["lr"].permute(0, 3, 1, 2), 0)
    # level 0: noise of std sqrt(beta_1) = 0.01 only
    assert (level == 0).all() and torch.allclose(zx, batch["lr"].permute(0, 3, 1, 2), atol=0.06)
    with pytest.raises(ValueError, match="noise_level"):
        model.low_scale_conditioning(batch["lr"].permute(0, 3, 1, 2), 1000)
    from ldm.superres import upscale
    with pytest.raises(ValueError, match="noise_level"):  # the user chooses the augmentation level
        upscale(model, batch["lr"].permute(0, 3, 1, 2), ["a photo"] * 2, steps=2)
    # a stand-in text encoder (token states from the prompt's length): guided, noise-augmented upscaling runs
    model.get_learned_conditioning = lambda texts: torch.stack([torch.full((3, 16), len(t) / 10) for t in texts])
    lr, prompts = batch["lr"].permute(0, 3, 1, 2), ["a photo", "a photo of a cat"]
    a = upscale(model.eval(), lr, prompts, steps=2, noise_level=20, scale=2.0, seed=1)
    b = upscale(model, lr, prompts, steps=2, noise_level=20, scale=2.0, seed=1)
    c = upscale(model, lr, prompts, steps=2, noise_level=300, scale=2.0, seed=1)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and not torch.allclose(a, c)


# -- inpainting sampling ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    from safetensors.torch import save_file
    ae = instantiate_from_config(load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml").model)
    perturb(ae, seed=5, scale=0.02)
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_file(ae.state_dict(), str(path))
    return str(path)


def tiny_txt2img(ae_ckpt: str):
    cfg = load_config(ROOT / "configs/ldm/shapes_txt2img.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = ae_ckpt
    cfg.model.params.unet_config.params.num_head_channels = 16
    model = instantiate_from_config(cfg.model).eval()
    perturb(model.model, seed=2)
    return model


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_ancestral", "heun", "plms", "unipc"])
def test_known_region_replacement_keeps_the_known_latents(sampler):
    """Any sampler: the known region of the result is the known latents (latent space)."""
    from ldm.core.denoiser import DiscreteSchedule
    from ldm.sampling import get_sigmas, inpaint_sample, randn_like
    from ldm.modules.diffusionmodules.schedule import make_beta_schedule
    ac = torch.cumprod(1 - torch.from_numpy(make_beta_schedule("linear", 1000, 0.00085, 0.012)), 0)
    sigmas = get_sigmas(DiscreteSchedule(ac), 12, "uniform")
    x0 = torch.randn(2, 4, 8, 8)
    known = torch.zeros(2, 1, 8, 8)
    known[..., :, :4] = 1
    def den(x, s, **kw):  # a denoiser pulling everything towards 0.3
        return x * 0.1 / (1 + s.view(-1, 1, 1, 1) ** 2) + 0.3
    g = torch.Generator().manual_seed(0)
    out = inpaint_sample(den, randn_like(x0, g), sigmas, known, x0, sampler, generator=g)
    assert (out - x0).mul(known).abs().max() < 1e-4
    assert (out - x0).mul(1 - known).abs().mean() > 0.1  # the hole is generated, not copied


def test_repaint_schedule_and_resampling():
    from ldm.sampling import repaint_schedule
    assert repaint_schedule(4, 1, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert repaint_schedule(5, 2, 3) == [(0, 2)] * 3 + [(2, 4)] * 3 + [(4, 5)]
    with pytest.raises(ValueError):
        repaint_schedule(5, 0, 1)


@pytest.mark.minilm
def test_inpaint_with_txt2img_model_keeps_known_pixels_exactly(ae_ckpt):
    from ldm.inpainting import InpaintMode, inpaint, inpaint_any_size, inpaint_mode
    model = tiny_txt2img(ae_ckpt)
    assert inpaint_mode(model) is InpaintMode.REPLACE
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    prompts = ["a large red circle in the center"] * 2
    out = inpaint(model, img, mask, prompts, steps=4, seed=[0, 1])
    keep = (mask == 0).expand_as(img)
    assert torch.equal(out[keep], img[keep])
    assert (out - img)[~keep].abs().mean() > 0.01
    rp = inpaint(model, img, mask, prompts, steps=4, seed=[0, 1], jump_length=2, jump_n_sample=2)
    assert torch.equal(rp[keep], img[keep]) and not torch.equal(rp, out)
    odd = torch.rand(1, 3, 30, 35) * 2 - 1
    om = torch.zeros(1, 1, 30, 35)
    om[..., 3:9, 10:20] = 1
    res = inpaint_any_size(model, odd, om, prompts[:1], steps=3, seed=0)
    assert res.shape == odd.shape and torch.equal(res[(om == 0).expand_as(odd)], odd[(om == 0).expand_as(odd)])


@pytest.mark.minilm
def test_shapes_inpainting_config_fine_tunes_and_inpaints(ae_ckpt, tmp_path):
    """The embedded config at tiny scale: loads a txt2img checkpoint (widened), trains a step, inpaints."""
    from safetensors.torch import save_file
    from ldm.inpainting import InpaintMode, inpaint, inpaint_mode
    txt = tiny_txt2img(ae_ckpt)
    save_file({k: v.contiguous() for k, v in txt.state_dict().items()}, str(tmp_path / "t2i.safetensors"))
    cfg = load_config(ROOT / "configs/ldm/shapes_inpainting.yaml")
    cfg.model.params.ckpt_path = str(tmp_path / "t2i.safetensors")
    cfg.model.params.first_stage_config.params.ckpt_path = ae_ckpt
    cfg.model.params.unet_config.params.num_head_channels = 16
    model = instantiate_from_config(cfg.model)
    assert inpaint_mode(model) is InpaintMode.MODEL
    assert float(model.scale_factor) == float(txt.scale_factor)  # the latent scale comes with the checkpoint
    ds = instantiate_from_config(cfg.data.params.train, extra_params={"num_samples": 4})
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    loss, log = model.shared_step(batch)
    assert torch.isfinite(loss)
    logged = model.log_images(batch, N=2, ddim_steps=2)
    assert {"mask", "masked_image", "samples", "inputs"} <= set(logged)
    img = batch["image"].permute(0, 3, 1, 2)[:2]
    mask = batch["mask"].permute(0, 3, 1, 2)[:2]
    out = inpaint(model.eval(), img, mask, list(batch["caption"][:2]), steps=3, seed=0)
    keep = (mask < 0.5).expand_as(img)
    assert torch.equal(out[keep], img[keep])
    with pytest.raises(ValueError, match="paper"):
        inpaint(model, img, mask, list(batch["caption"][:2]), steps=3, mode="paper")
    # img2img (SDEdit) with an inpainting model: nothing known, the text and the init image guide it
    from ldm.generation import img2img
    res = img2img(model, img, list(batch["caption"][:2]), strength=0.5, steps=4, sampler="ddim", scale=3.0, seed=0)
    assert res.shape == img.shape and torch.isfinite(res).all()


# -- super-resolution --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sr(tmp_path_factory):
    from safetensors.torch import save_file
    tmp = tmp_path_factory.mktemp("sr")
    ae_cfg = load_config(ROOT / "configs/autoencoder/skimage_kl_f4.yaml")
    ae_cfg.model.params.ddconfig.ch = 16
    ae = instantiate_from_config(ae_cfg.model)
    perturb(ae, seed=4, scale=0.02)
    save_file(ae.state_dict(), str(tmp / "ae.safetensors"))
    cfg = load_config(ROOT / "configs/ldm/skimage_sr4.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = str(tmp / "ae.safetensors")
    cfg.model.params.first_stage_config.params.ddconfig.ch = 16
    cfg.model.params.unet_config.params.model_channels = 32
    model = instantiate_from_config(cfg.model).eval()
    perturb(model.model, seed=3)
    return model, cfg, tmp


def test_sr_config_trains_a_step(tiny_sr):
    model, cfg, _ = tiny_sr
    ds = instantiate_from_config(cfg.data.params.validation, extra_params={"num_samples": 4})
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    model.train()
    loss, _ = model.shared_step(batch)
    model.eval()
    assert torch.isfinite(loss)
    logged = model.log_images(batch, N=2, ddim_steps=2)
    assert logged["conditioning"].shape == (2, 3, 8, 8) and logged["samples"].shape == (2, 3, 32, 32)


def test_tiled_superres_equals_untiled_when_it_fits_and_blends_large_inputs(tiny_sr):
    from ldm.superres import blend_weights, tile_starts, upscale
    model, _, _ = tiny_sr
    lr = torch.rand(2, 3, 8, 8) * 2 - 1
    a = upscale(model, lr, steps=3, seed=5)
    b = upscale(model, lr, steps=3, seed=5, tile=16, overlap=4)  # one tile either way
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    big = torch.rand(1, 3, 12, 20) * 2 - 1
    t1 = upscale(model, big, steps=2, seed=1, tile=8, overlap=4, tile_batch=1)
    t4 = upscale(model, big, steps=2, seed=1, tile=8, overlap=4, tile_batch=4)
    assert t1.shape == (1, 3, 48, 80) and torch.isfinite(t1).all() and torch.allclose(t1, t4, atol=1e-5)
    odd = upscale(model, torch.rand(1, 3, 5, 7) * 2 - 1, steps=2, seed=0)  # sides the UNet cannot take as they are
    assert odd.shape == (1, 3, 20, 28) and torch.isfinite(odd).all()
    assert tile_starts(20, 8, 4) == [0, 4, 8, 12] and tile_starts(8, 8, 2) == [0]
    assert tile_starts(12, 8, 4)[-1] == 4
    w = blend_weights(8, 8, 2)
    assert w[0, 0, 4, 4] == 1 and 0 < w[0, 0, 0, 0] < w[0, 0, 1, 1] < 1


# -- configs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["configs/ldm/inpainting_big.yaml", "configs/ldm/bsr_sr.yaml"])
def test_paper_configs_instantiate_at_tiny_width(path):
    cfg = load_config(ROOT / path)
    p = cfg.model.params
    p.unet_config.params.model_channels = 32
    p.unet_config.params.channel_mult = [1, 2]
    p.unet_config.params.attention_resolutions = [2]
    p.unet_config.params.image_size = 8
    p.image_size = 8
    fs = p.first_stage_config.params
    fs.ckpt_path, fs.n_embed = None, 64
    fs.ddconfig.ch, fs.ddconfig.num_res_blocks = 16, 1
    model = instantiate_from_config(cfg.model)
    w = model.state_dict()["model.diffusion_model.input_blocks.0.0.weight"]
    assert w.shape[1] == (7 if "inpainting" in path else 6)
    perturb(model.model)
    if "inpainting" in path:  # the paper layout: masked-image latent + mask concatenated, CompVis convention
        from ldm.inpainting import InpaintMode, inpaint, inpaint_mode
        assert inpaint_mode(model) is InpaintMode.PAPER
        img, mask = torch.rand(1, 3, 32, 32) * 2 - 1, torch.zeros(1, 1, 32, 32)
        mask[..., 4:12, 4:12] = 1
        out = inpaint(model.eval(), img, mask, steps=2, seed=0)
        assert torch.equal(out[(mask == 0).expand_as(img)], img[(mask == 0).expand_as(img)])
        batch = {"image": img.permute(0, 2, 3, 1), "mask": mask.permute(0, 2, 3, 1) * 2 - 1,
                 "masked_image": img.permute(0, 2, 3, 1)}
        z, c = model.get_input(batch, "image")
        assert c.shape[1] == 4  # 3 latent channels + the mask
        assert torch.isfinite(model.p_losses(z, c)[0])


# -- scripts -------------------------------------------------------------------------------------------
def save_run(model, cfg, tmp: Path, name: str) -> tuple[str, str]:
    """A checkpoint and its config, as a user would pass them with --ckpt / --config."""
    ckpt, conf = tmp / f"{name}.ckpt", tmp / f"{name}.yaml"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    OmegaConf.save(cfg, conf)
    return str(ckpt), str(conf)


@pytest.mark.minilm
def test_inpaint_script(ae_ckpt, tmp_path, capsys):
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    import inpaint as script
    model = tiny_txt2img(ae_ckpt)
    cfg = load_config(ROOT / "configs/ldm/shapes_txt2img.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = ae_ckpt
    cfg.model.params.unet_config.params.num_head_channels = 16
    ckpt, conf = save_run(model, cfg, tmp_path, "t2i")
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a", (32, 32)), ("b", (40, 28))):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(indir / f"{name}.png")
        m = np.zeros(size, np.uint8)
        m[4:12, 6:20] = 255
        Image.fromarray(m).save(indir / f"{name}_mask.png")
    args = ["--indir", str(indir), "--outdir", str(outdir), "--steps", "3", "--ckpt", ckpt, "--config", conf,
            "--sampler", "dpmpp_2m", "--seed", "3", "--device", "cpu"]
    assert script.main(args) == 2 and "--prompt" in capsys.readouterr().err  # a text model needs a prompt
    assert script.main(args + ["--prompt", "a large red circle in the center", "--jump_n_sample", "2",
                               "--jump_length", "2"]) == 0
    for name in ("a", "b"):
        src = np.asarray(Image.open(indir / f"{name}.png"))
        out = np.asarray(Image.open(outdir / f"{name}.png"))
        keep = np.asarray(Image.open(indir / f"{name}_mask.png")) == 0
        assert out.shape == src.shape and np.array_equal(out[keep], src[keep])  # unmasked pixels exactly
        assert Image.open(outdir / f"{name}.png").text["sampler"] == "dpmpp_2m"
    (indir / "c_mask.png").write_bytes((indir / "a_mask.png").read_bytes())
    assert script.main(args) == 2 and "has no image" in capsys.readouterr().err
    assert script.main(["--indir", str(tmp_path / "nowhere"), "--outdir", str(outdir), "--ckpt", ckpt]) == 2


def test_superres_and_img2img_scripts_with_sr_model(tiny_sr, tmp_path, capsys):
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    import img2img as img2img_script
    import superres as script
    model, cfg, tmp = tiny_sr
    ckpt, conf = save_run(model, cfg, tmp_path, "sr")
    indir, outdir = tmp_path / "lr", tmp_path / "hr"
    indir.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(indir / "small.png")
    Image.fromarray((rng.random((10, 14, 3)) * 255).astype(np.uint8)).save(indir / "wide.jpg")
    assert script.main(["--indir", str(indir), "--outdir", str(outdir), "--steps", "2", "--ckpt", ckpt,
                        "--config", conf, "--tile", "8", "--overlap", "2", "--device", "cpu"]) == 0
    assert Image.open(outdir / "small.png").size == (32, 32) and Image.open(outdir / "wide.png").size == (56, 40)
    assert script.main(["--indir", str(tmp_path / "none"), "--outdir", str(outdir), "--ckpt", ckpt]) == 2
    capsys.readouterr()
    # img2img with a super-resolution model: the conditioning is the init image at low resolution
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "init.png")
    assert img2img_script.main(["--init-img", str(tmp_path / "init.png"), "--prompt", "", "--strength", "0.5",
                                "--ddim_steps", "4", "--n_samples", "1", "--ckpt", ckpt, "--config", conf,
                                "--outdir", str(tmp_path / "i2i"), "--device", "cpu"]) == 0
    assert len(list((tmp_path / "i2i" / "samples").glob("*.png"))) == 1
