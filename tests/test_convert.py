"""Checkpoint export: safetensors / CompVis .ckpt round trips are bit-exact; fp16 / bf16, EMA-only, training parts
stripped; on weights perturbed away from their initialisation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_checkpoint
from ldm.convert.export import ema_shadow_name, export_checkpoint
from ldm.util import instantiate_from_config, load_config, load_model_from_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _perturb(module: torch.nn.Module, seed: int, buffers: bool = True) -> None:
    """Weights (and, with `buffers`, floating buffers such as EMA copies) moved away from their initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        extra = [b for b in module.buffers() if b.is_floating_point()] if buffers else []
        for t in list(module.parameters()) + extra:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)


@pytest.fixture
def ldm_model(tmp_path):
    cfg = load_config(ROOT / "configs/ldm/shapes_uncond.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = None
    cfg.model.params.unet_config.params.model_channels = 32
    OmegaConf.save(cfg, tmp_path / "ldm.yaml")
    model = instantiate_from_config(cfg.model)
    _perturb(model.model, 1)
    _perturb(model.model_ema, 2)  # EMA copies differ from the training weights
    _perturb(model.first_stage_model, 3)
    return model, tmp_path / "ldm.yaml"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_is_bit_exact(ldm_model, tmp_path, suffix):
    model, cfg = ldm_model
    path = export_checkpoint(model, tmp_path / f"m{suffix}")
    back = load_model_from_config(cfg, path)
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_ema_only_puts_the_ema_weights_in_place(ldm_model, tmp_path):
    model, cfg = ldm_model
    sd = model.state_dict()
    path = export_checkpoint(model, tmp_path / "ema.safetensors", ema_only=True)
    exported = load_checkpoint(path)["state_dict"]
    assert not any(k.startswith("model_ema.") for k in exported)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(exported[key], sd[ema_shadow_name(key)]) and not torch.equal(exported[key], sd[key])
    back = load_model_from_config(cfg, path)  # use_ema: the EMA starts from the loaded (EMA) weights
    assert torch.equal(back.state_dict()[key], sd[ema_shadow_name(key)])
    with pytest.raises(ValueError, match="no EMA weights"):
        export_checkpoint(model.first_stage_model, tmp_path / "x.safetensors", ema_only=True)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_reduced_precision_exports_reload_with_their_dtype(ldm_model, tmp_path, dtype, torch_dtype):
    model, cfg = ldm_model
    for suffix in (".safetensors", ".ckpt"):
        path = export_checkpoint(model, tmp_path / f"m-{dtype}{suffix}", dtype=dtype)
        sd = load_checkpoint(path)["state_dict"]
        floats = [v for v in sd.values() if v.is_floating_point()]
        assert floats and all(v.dtype == torch_dtype for v in floats)
        key = "model.diffusion_model.out.2.weight"
        assert torch.equal(sd[key], model.state_dict()[key].to(torch_dtype))
        back = load_model_from_config(cfg, path)  # loads into the float32 model
        assert torch.allclose(back.state_dict()[key], model.state_dict()[key], rtol=1e-2, atol=1e-3)


def test_strip_training_drops_the_autoencoder_loss(tmp_path):
    cfg = load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml")
    ae = instantiate_from_config(cfg.model)
    _perturb(ae, 4)
    assert any(k.startswith("loss.discriminator.") for k in ae.state_dict())
    path = export_checkpoint(ae, tmp_path / "ae.safetensors", strip_training=True)
    sd = load_checkpoint(path)["state_dict"]
    assert not any(k.startswith("loss.") for k in sd)
    cfg.model.params.lossconfig = {"target": "torch.nn.Identity"}  # how an LDM config holds a frozen first stage
    back = load_model_from_config(cfg, path)  # strict: nothing missing, nothing unexpected
    assert torch.equal(back.state_dict()["decoder.conv_out.weight"], ae.state_dict()["decoder.conv_out.weight"])


def test_convert_script(ldm_model, tmp_path, capsys):
    import convert
    model, cfg = ldm_model
    src = export_checkpoint(model, tmp_path / "full.ckpt")
    assert convert.main(["--ckpt", str(src), "--out", str(tmp_path / "s.safetensors"), "--dtype", "fp16",
                         "--ema-only", "--strip-training"]) == 0
    sd = load_checkpoint(tmp_path / "s.safetensors")["state_dict"]
    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert convert.main(["--ckpt", str(src), "--out", str(tmp_path / "s.bin")]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert convert.main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o.ckpt")]) == 2


# --- diffusers layouts ------------------------------------------------------------------------------------------

def _tiny_vae():
    cfg = load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml").model.params.first_stage_config
    cfg.params.ddconfig.ch = 32
    ae = instantiate_from_config(cfg).eval()
    _perturb(ae, 5)
    return ae, cfg.params.ddconfig


def test_kl_autoencoder_to_diffusers_computes_the_same_and_comes_back_bit_exact():
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from ldm.convert.diffusers_vae import compvis_to_diffusers_vae, diffusers_to_compvis_vae
    ae, dd = _tiny_vae()
    levels = len(dd.ch_mult)
    twin = DiffusersAutoencoderKL(
        in_channels=dd.in_channels, out_channels=dd.out_ch, latent_channels=dd.z_channels,
        block_out_channels=tuple(dd.ch * m for m in dd.ch_mult), layers_per_block=dd.num_res_blocks,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=32).eval()
    converted = compvis_to_diffusers_vae(ae.state_dict())
    twin.load_state_dict(converted, strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours, theirs = ae.encode(x), twin.encode(x).latent_dist
        assert torch.allclose(ours.mean, theirs.mean, rtol=1e-4, atol=1e-5)
        assert torch.allclose(ours.logvar, theirs.logvar, rtol=1e-4, atol=1e-5)
        z = torch.randn(2, 4, 4, 4)
        a, b = ae.decode(z), twin.decode(z).sample
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    back = diffusers_to_compvis_vae(twin.state_dict(), ae.state_dict().keys())
    sd = ae.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_unet_to_diffusers_and_back_is_bit_exact(v2):
    from ldm.convert.diffusers_unet import compvis_to_diffusers_unet, diffusers_to_compvis_unet
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from test_unet import _tiny
    cfg = _tiny(v2)
    unet = UNetModel(**cfg)
    _perturb(unet, 6)
    sd = unet.state_dict()
    levels = len(cfg["channel_mult"])
    there = compvis_to_diffusers_unet(sd, 2, levels, attention_levels=[0, 1, 2])
    back = diffusers_to_compvis_unet(there, list(sd), 2, levels, attention_levels=[0, 1, 2])
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="no CompVis counterpart"):
        diffusers_to_compvis_unet({**there, "extra.weight": torch.zeros(1)}, list(sd), 2, levels, [0, 1, 2])


@pytest.fixture
def tiny_sd_v1(tmp_path, monkeypatch):
    """v1-inference.yaml at tiny width, its CLIP text encoder (tiny) in the HF cache; weights perturbed."""
    from _helpers import tiny_sd_v1_config
    cfg = tiny_sd_v1_config(tmp_path, monkeypatch)
    model = instantiate_from_config(cfg.model).eval()
    _perturb(model.model, 7)
    _perturb(model.first_stage_model, 8)
    return model, cfg


def test_sd_v1_pipeline_folder_loads_in_diffusers_and_samples_the_same(tiny_sd_v1, tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    from ldm.convert.diffusers_pipeline import from_diffusers_pipeline, to_diffusers_pipeline
    from ldm.generation import sample_prompts
    model, cfg = tiny_sd_v1
    folder = to_diffusers_pipeline(model, cfg, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = pipe("a lighthouse on a cliff", height=64, width=64, num_inference_steps=5, guidance_scale=3.0,
                      latents=latents.clone(), output_type="pt").images
    ours = sample_prompts(model, ["a lighthouse on a cliff"], steps=5, sampler="ddim", scale=3.0, seed=0,
                          x_T=latents.clone(), shape=(4, 8, 8))
    ours = ((ours + 1) / 2).clamp(0, 1)
    assert ours.shape == theirs.shape
    assert float(ours.std()) > 0.05  # a picture, not a constant
    assert torch.allclose(ours, theirs, atol=2e-4), (ours - theirs).abs().max()
    # and back: the folder read into a fresh model gives the same weights, bit for bit
    fresh = instantiate_from_config(cfg.model)
    sd = from_diffusers_pipeline(folder, fresh, cfg)
    fresh.load_state_dict(sd, strict=True)
    a, b = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_convert_script_to_and_from_diffusers(tiny_sd_v1, tmp_path):
    pytest.importorskip("diffusers")
    import convert
    model, cfg = tiny_sd_v1
    OmegaConf.save(cfg, tmp_path / "v1.yaml")
    src = export_checkpoint(model, tmp_path / "sd.safetensors")
    assert convert.main(["--ckpt", str(src), "--config", str(tmp_path / "v1.yaml"),
                         "--to-diffusers", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    assert convert.main(["--from-diffusers", str(tmp_path / "pipe"), "--config", str(tmp_path / "v1.yaml"),
                         "--out", str(tmp_path / "back.safetensors")]) == 0
    a, b = load_checkpoint(src)["state_dict"], load_checkpoint(tmp_path / "back.safetensors")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert convert.main(["--from-diffusers", str(tmp_path / "pipe"), "--out", str(tmp_path / "x.ckpt")]) == 2


def test_vq_autoencoder_to_diffusers_vqmodel_computes_the_same_and_comes_back_bit_exact():
    """VQ-f8's layout (attention at resolution 32 of the encoder / decoder levels) at tiny width."""
    pytest.importorskip("diffusers")
    from diffusers import VQModel as DiffusersVQModel

    from ldm.convert.diffusers_vae import compvis_to_diffusers_vae, diffusers_autoencoder_config, diffusers_to_compvis_vae
    cfg = load_config(ROOT / "configs/autoencoder/autoencoder_vq_f8.yaml").model
    dd = cfg.params.ddconfig
    dd.ch, dd.resolution, dd.attn_resolutions = 32, 64, [16]  # attention on the third level, as vq-f8 at 256
    cfg.params.n_embed = 64
    cfg.params.lossconfig = {"target": "torch.nn.Identity"}
    vq = instantiate_from_config(cfg).eval()
    _perturb(vq, 9)
    assert any(".attn." in k for k in vq.state_dict())
    twin = DiffusersVQModel(**diffusers_autoencoder_config(dd, n_embed=cfg.params.n_embed,
                                                           embed_dim=cfg.params.embed_dim)).eval()
    twin.load_state_dict(compvis_to_diffusers_vae(vq.state_dict()), strict=True)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        h, h2 = vq.encode_to_prequant(x), twin.encode(x).latents
        assert torch.allclose(h, h2, rtol=1e-4, atol=1e-4), (h - h2).abs().max()
        quant = vq.quantize(h)[0]
        a, b = vq.decode(quant), twin.decode(h).sample  # diffusers quantizes inside decode
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    back = diffusers_to_compvis_vae(twin.state_dict(), vq.state_dict().keys())
    sd = vq.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def _tiny_sd2(tmp_path, monkeypatch, name: str):
    """An SD2 config (OpenCLIP ViT-H-14 by name) at tiny width; the tiny tower in the HF cache under the real repo."""
    import open_clip.factory

    from test_pretrained import TINY_OPENCLIP, openclip_weights, put_in_hub_cache
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ViT-H-14", TINY_OPENCLIP)
    src = openclip_weights("ViT-H-14", tmp_path / "h14.bin", seed=10)
    put_in_hub_cache(tmp_path / "hf" / "hub", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", {"open_clip_pytorch_model.bin": src})
    cfg = load_config(ROOT / "configs/stable-diffusion" / name)
    u, fs = cfg.model.params.unet_config.params, cfg.model.params.first_stage_config.params
    u.model_channels, u.context_dim, u.use_checkpoint = 32, 16, False
    if u.get("num_head_channels", -1) != -1:
        u.num_head_channels = 16
    else:
        u.num_heads = 2
    fs.ddconfig.ch = 32
    model = instantiate_from_config(cfg.model).eval()
    _perturb(model.model, 11)
    _perturb(model.first_stage_model, 12)
    _perturb(model.cond_stage_model, 13, buffers=False)  # its causal mask is a buffer too
    return model, cfg


@pytest.mark.parametrize("name", ["v2-inference.yaml", "v2-inference-v.yaml"])
def test_sd_v2_pipeline_folder_samples_the_same_in_diffusers(name, tmp_path, monkeypatch):
    """OpenCLIP's penultimate layer as a 1-layer-shorter CLIPTextModel; eps and v prediction."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    from ldm.convert.diffusers_pipeline import from_diffusers_pipeline, to_diffusers_pipeline
    from ldm.generation import sample_prompts
    model, cfg = _tiny_sd2(tmp_path, monkeypatch, name)
    folder = to_diffusers_pipeline(model, cfg, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.config.num_hidden_layers == 1  # the tiny tower has 2 blocks; SD2 reads the first
    ids = pipe.tokenizer(["a red bicycle", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():  # the converted text encoder computes SD2's penultimate-layer states
        a, b = model.get_learned_conditioning(["a red bicycle", ""]), pipe.text_encoder(ids)[0]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = pipe("a red bicycle", height=64, width=64, num_inference_steps=5, guidance_scale=4.0,
                      latents=latents.clone(), output_type="pt").images
    ours = ((sample_prompts(model, ["a red bicycle"], steps=5, sampler="ddim", scale=4.0, seed=0, x_T=latents.clone(),
                            shape=(4, 8, 8)) + 1) / 2).clamp(0, 1)
    assert float(ours.std()) > 0.05
    assert torch.allclose(ours, theirs, atol=2e-4), (ours - theirs).abs().max()
    fresh = instantiate_from_config(cfg.model)
    fresh.load_state_dict(from_diffusers_pipeline(folder, fresh, cfg), strict=True)
    a, b = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_sd_v2_inpainting_folder_loads_in_the_inpaint_pipeline_and_comes_back(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionInpaintPipeline

    from ldm.convert.diffusers_pipeline import from_diffusers_pipeline, to_diffusers_pipeline
    model, cfg = _tiny_sd2(tmp_path, monkeypatch, "v2-inpainting-inference.yaml")
    folder = to_diffusers_pipeline(model, cfg, tmp_path / "pipe")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(folder), local_files_only=True)
    assert pipe.unet.config.in_channels == 9
    fresh = instantiate_from_config(cfg.model)
    fresh.load_state_dict(from_diffusers_pipeline(folder, fresh, cfg), strict=True)
    a, b = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_x4_upscaler_folder_loads_in_the_upscale_pipeline_and_its_unet_computes_the_same(tmp_path, monkeypatch):
    """The noise level as diffusers' class embedding, cross-attention-only transformers on the first levels."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionUpscalePipeline

    from ldm.convert.diffusers_pipeline import from_diffusers_pipeline, to_diffusers_pipeline
    model, cfg = _tiny_sd2(tmp_path, monkeypatch, "x4-upscaling.yaml")
    folder = to_diffusers_pipeline(model, cfg, tmp_path / "pipe")
    pipe = StableDiffusionUpscalePipeline.from_pretrained(str(folder), local_files_only=True)
    assert pipe.config.max_noise_level == 350 and pipe.unet.config.num_class_embeds == 1000
    unet = model.model.diffusion_model
    x, t = torch.randn(2, 7, 16, 16), torch.tensor([20, 700])
    c, level = torch.randn(2, 5, 16), torch.tensor([10, 300])
    with torch.no_grad():
        ours = unet(x, t, context=c, y=level)
        theirs = pipe.unet(x, t, encoder_hidden_states=c, class_labels=level).sample
    assert float(ours.abs().mean()) > 1e-3 and torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    betas = torch.tensor(pipe.low_res_scheduler.betas)
    assert torch.allclose(betas.double(), model.low_scale_model.betas.double().cpu(), atol=1e-9)
    fresh = instantiate_from_config(cfg.model)
    fresh.load_state_dict(from_diffusers_pipeline(folder, fresh, cfg), strict=True)
    a, b = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_convert_script_writes_a_vq_first_stage_as_a_diffusers_vqmodel_folder(tmp_path):
    pytest.importorskip("diffusers")
    import convert
    from diffusers import VQModel as DiffusersVQModel
    cfg = load_config(ROOT / "configs/autoencoder/autoencoder_vq_f4.yaml")
    cfg.model.params.ddconfig.ch, cfg.model.params.ddconfig.resolution, cfg.model.params.n_embed = 32, 32, 64
    cfg.model.params.lossconfig = {"target": "torch.nn.Identity"}
    OmegaConf.save(cfg, tmp_path / "vq.yaml")
    vq = instantiate_from_config(cfg.model).eval()
    _perturb(vq, 14)
    src = export_checkpoint(vq, tmp_path / "vq.safetensors")
    assert convert.main(["--ckpt", str(src), "--config", str(tmp_path / "vq.yaml"), "--to-diffusers",
                         str(tmp_path / "vq-diffusers")]) == 0
    twin = DiffusersVQModel.from_pretrained(str(tmp_path / "vq-diffusers"), local_files_only=True).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = vq.encode_to_prequant(x)
        assert torch.allclose(vq.decode(vq.quantize(h)[0]), twin.decode(twin.encode(x).latents).sample, atol=1e-4)
