"""LoRA through peft: adapters that save and load exactly, merge into the weights they adapt, and travel in the
layouts users share (diffusers' `load_lora_weights`, kohya's names)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from _helpers import perturb, tiny_sd2
from ldm.convert.lora import LoraLayout, diffusers_names, load_adapter, merge_lora_files, save_adapter
from ldm.errors import InputError
from ldm.lora import Adapter, LoraSettings, add_lora, load_lora_state_dict, lora_state_dict, merge_into_state_dict
from ldm.util import instantiate_from_config

from test_convert import tiny_sd_v1  # noqa: F401  (the fixture: a tiny SD-v1-layout model, weights perturbed)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _unet(seed: int = 0):
    torch.manual_seed(seed)
    model = instantiate_from_config(tiny_sd2("v2-inference").model).eval()
    perturb(model.model, seed=seed + 1)
    return model.model.diffusion_model


def _train_adapter(unet, seed: int = 2, scale: float = 0.1) -> None:
    """Adapter weights moved off their initialisation (B = 0 would make every comparison pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


INPUTS = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)), torch.tensor([10, 600]),
          torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(10)))


def test_adapter_starts_as_the_base_trains_only_itself_and_round_trips_exactly(tmp_path):
    unet = _unet()
    before = unet(*INPUTS[:2], context=INPUTS[2])
    settings = LoraSettings(rank=2, alpha=4.0)
    layers = add_lora(unet, settings)
    assert layers and len(layers) == 8 * sum(".attn1.to_q" in n for n in layers)  # q, k, v, out of attn1 and attn2
    assert torch.equal(unet(*INPUTS[:2], context=INPUTS[2]), before)  # B = 0: the base model, exactly
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    _train_adapter(unet)
    adapted = unet(*INPUTS[:2], context=INPUTS[2])
    assert (adapted - before).abs().max() > 1e-3
    sd = lora_state_dict(unet)
    path = save_adapter(tmp_path / "a.safetensors", Adapter.from_state_dict(sd, settings.scaling), unet, "ldm")
    back = load_adapter(path, unet)
    assert back.scaling == settings.scaling and back.pairs.keys() == {k.rsplit(".lora_", 1)[0] for k in sd}
    assert all(torch.equal(back.pairs[k][0], sd[f"{k}.lora_A.weight"]) and
               torch.equal(back.pairs[k][1], sd[f"{k}.lora_B.weight"]) for k in back.pairs)
    fresh = _unet()
    add_lora(fresh, settings)
    load_lora_state_dict(fresh, sd)
    assert torch.equal(fresh(*INPUTS[:2], context=INPUTS[2]), adapted)
    with pytest.raises(InputError, match="missing"):
        load_lora_state_dict(fresh, {k: v for k, v in sd.items() if ".attn2." not in k})


def test_merged_weights_compute_what_the_adapter_computes():
    unet = _unet()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    settings = LoraSettings(rank=3, alpha=1.5, feed_forward=True)
    add_lora(unet, settings)
    _train_adapter(unet)
    adapted = unet(*INPUTS[:2], context=INPUTS[2])
    merged = _unet()
    merged.load_state_dict(merge_into_state_dict(
        base, [(Adapter.from_state_dict(lora_state_dict(unet), settings.scaling), 1.0)], prefix=""))
    out = merged(*INPUTS[:2], context=INPUTS[2])
    assert torch.allclose(out, adapted, atol=1e-5, rtol=1e-4), (out - adapted).abs().max()
    half = _unet()
    half.load_state_dict(merge_into_state_dict(
        base, [(Adapter.from_state_dict(lora_state_dict(unet), settings.scaling), 0.5)], prefix=""))
    assert not torch.allclose(half(*INPUTS[:2], context=INPUTS[2]), out, atol=1e-4)  # the scale acts


def test_kohya_and_diffusers_files_reimport_to_the_same_weights(tmp_path):
    unet = _unet()
    add_lora(unet, LoraSettings(rank=2, alpha=6.0))
    _train_adapter(unet)
    adapter = Adapter.from_state_dict(lora_state_dict(unet), 3.0)
    for layout in (LoraLayout.KOHYA, LoraLayout.DIFFUSERS):
        back = load_adapter(save_adapter(tmp_path / f"{layout.value}.safetensors", adapter, unet, layout), unet)
        assert back.pairs.keys() == adapter.pairs.keys()
        for layer in adapter.pairs:  # alpha / rank is folded into B on the way in: the same weight change
            assert torch.allclose(back.delta(layer), adapter.delta(layer), rtol=1e-6, atol=1e-7)
    from safetensors.torch import load_file
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert float(kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 6.0


def test_a_lora_file_of_another_model_is_refused_with_its_name(tmp_path):
    unet = _unet()
    add_lora(unet, LoraSettings(rank=2))
    _train_adapter(unet)
    sd = lora_state_dict(unet)
    path = save_adapter(tmp_path / "ok.safetensors", Adapter.from_state_dict(sd), unet, "diffusers")
    other = Adapter({"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (torch.ones(2, 5), torch.ones(32, 2))})
    bad = save_adapter(tmp_path / "other.safetensors", other, unet, "ldm")
    model = instantiate_from_config(tiny_sd2("v2-inference").model).eval()
    merge_lora_files(model, [f"{path}:0.5"])
    with pytest.raises(InputError, match="other.safetensors|does not fit"):
        merge_lora_files(model, [str(bad)])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="junk.safetensors"):
        load_adapter(tmp_path / "junk.safetensors", unet)


def _random_adapter(unet, rank: int = 2, seed: int = 4) -> Adapter:
    """An adapter on every attention projection of the transformer blocks, weights drawn at random."""
    g = torch.Generator().manual_seed(seed)
    layers = dict(unet.named_modules())
    pairs = {}
    for name in diffusers_names(unet):
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"):
            w = layers[name].weight
            pairs[name] = (torch.randn(rank, w.shape[1], generator=g) * 0.2,
                           torch.randn(w.shape[0], rank, generator=g) * 0.2)
    return Adapter(pairs, scaling=2.0)


def test_diffusers_pipeline_loading_our_exported_lora_gives_our_images(tiny_sd_v1, tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    from ldm.convert.diffusers_pipeline import to_diffusers_pipeline
    from ldm.generation import sample_prompts
    model, cfg = tiny_sd_v1
    folder = to_diffusers_pipeline(model, cfg, tmp_path / "pipe")  # the base model
    unet = model.model.diffusion_model
    file = save_adapter(tmp_path / "lora.safetensors", _random_adapter(unet), unet, "diffusers")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    base = sample_prompts(model, ["a lighthouse"], steps=4, sampler="ddim", scale=3.0, seed=0, x_T=latents.clone(),
                          shape=(4, 8, 8))
    merge_lora_files(model, [f"{file}:0.7"])
    ours = ((sample_prompts(model, ["a lighthouse"], steps=4, sampler="ddim", scale=3.0, seed=0, x_T=latents.clone(),
                            shape=(4, 8, 8)) + 1) / 2).clamp(0, 1)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(file), adapter_name="ours")
    pipe.set_adapters(["ours"], adapter_weights=[0.7])
    with torch.no_grad():
        theirs = pipe("a lighthouse", height=64, width=64, num_inference_steps=4, guidance_scale=3.0,
                      latents=latents.clone(), output_type="pt").images
    assert (ours - ((base + 1) / 2).clamp(0, 1)).abs().max() > 1e-2  # the adapter changes the images
    assert torch.allclose(ours, theirs, atol=5e-4), (ours - theirs).abs().max()


def test_convert_merges_lora_files_into_a_checkpoint(tiny_sd_v1, tmp_path):
    import convert
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_checkpoint
    from ldm.convert.export import export_checkpoint
    model, cfg = tiny_sd_v1
    OmegaConf.save(cfg, tmp_path / "v1.yaml")
    src = export_checkpoint(model, tmp_path / "sd.safetensors")
    unet = model.model.diffusion_model
    adapter = _random_adapter(unet)
    kohya = save_adapter(tmp_path / "k.safetensors", adapter, unet, "kohya")
    assert convert.main(["--ckpt", str(src), "--config", str(tmp_path / "v1.yaml"), "--merge-lora", f"{kohya}:0.5",
                         "--merge-lora", f"{kohya}:0.25", "--out", str(tmp_path / "merged.safetensors")]) == 0
    merged = load_checkpoint(tmp_path / "merged.safetensors")["state_dict"]
    expected = merge_into_state_dict(load_checkpoint(src)["state_dict"], [(adapter, 0.75)])
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(merged[key], load_checkpoint(src)["state_dict"][key])
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected if k.startswith("model."))
    assert convert.main(["--ckpt", str(src), "--merge-lora", str(kohya), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert convert.main(["--ckpt", str(src), "--config", str(tmp_path / "v1.yaml"), "--merge-lora",
                         str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "y.safetensors")]) == 2


def test_merging_into_a_model_with_ema_changes_the_weights_sampling_uses():
    from ldm.lora import merge_into_model
    cfg = tiny_sd2("v2-inference")
    cfg.model.params.use_ema = True
    model = instantiate_from_config(cfg.model).eval()
    perturb(model.model, seed=3)
    model.model_ema.reset_to(model.model)
    perturb(model.model, seed=4)  # training weights and EMA weights differ, as after training
    unet = model.model.diffusion_model
    layer = "input_blocks.1.1.transformer_blocks.0.attn2.to_v"
    adapter = _random_adapter(unet)
    with model.ema_scope():
        ema_before = unet.get_submodule(layer).weight.detach().clone()
    train_before = unet.get_submodule(layer).weight.detach().clone()
    merge_into_model(model, [(adapter, 0.5)])
    with model.ema_scope():
        assert torch.allclose(unet.get_submodule(layer).weight, ema_before + 0.5 * adapter.delta(layer), atol=1e-6)
    assert torch.allclose(unet.get_submodule(layer).weight, train_before + 0.5 * adapter.delta(layer), atol=1e-6)


def _perturbed_base(tiny_run, tmp_path):
    """The tiny run's weights with its UNet moved away from initialisation (2 training steps leave its output layer
    near zero, and then no gradient reaches an adapter); without EMA weights, so the EMA starts from these."""
    from safetensors.torch import save_file

    from ldm.checkpoint import load_checkpoint
    sd = load_checkpoint(tiny_run / "checkpoints" / "last.ckpt")["state_dict"]
    g = torch.Generator().manual_seed(11)
    out = {}
    for k, v in sd.items():
        if k.startswith("model_ema."):
            continue
        if k.startswith("model.diffusion_model.") and v.is_floating_point():
            v = v + torch.randn(v.shape, generator=g) * 0.05
        out[k] = v.contiguous()
    path = tmp_path / "base.safetensors"
    save_file(out, str(path))
    return path


def _lora_run(base, tiny_run, tmp_path, name: str, *extra: str) -> int:
    import main as main_mod
    project = sorted((tiny_run / "configs").glob("*-project.yaml"))[-1]
    return main_mod.main(["--base", str(project), str(ROOT / "configs/finetune/lora.yaml"), "-t", "-n", name,
                          "-l", str(tmp_path), f"model.params.ckpt_path={base}", "model.base_learning_rate=1e-3",
                          "model.params.scheduler_config=null",  # no warm-up: 3 steps must move the adapters
                          "lightning.trainer.max_steps=3", "lightning.trainer.enable_progress_bar=false", *extra])


def test_main_trains_only_the_adapters_saves_them_alone_and_refuses_another_base(tiny_run, tmp_path, capsys):
    from ldm.checkpoint import load_checkpoint
    from ldm.runs import RunDir, load_for_sampling
    base_file = _perturbed_base(tiny_run, tmp_path)
    assert _lora_run(base_file, tiny_run, tmp_path, "lora") == 0
    run = RunDir(next(tmp_path.glob("*_lora")))
    ckpt = load_checkpoint(run.last, allow_pickle=True)
    sd, base_sd = ckpt["state_dict"], load_checkpoint(base_file)["state_dict"]
    assert ckpt["global_step"] == 3 and ckpt["lora_base"]["sha256"]
    assert any(".lora_A." in k for k in sd) and not any(k.startswith("first_stage_model.") for k in sd)
    assert not any(k.endswith("to_q.base_layer.weight") for k in sd)  # the base weights are referenced, not copied
    size = sum(v.numel() for v in sd.values() if v.is_floating_point())
    assert size < 0.2 * sum(v.numel() for v in base_sd.values() if v.is_floating_point())
    # sampling the run's checkpoint: base from ckpt_path, adapters from the run; the adapters moved the UNet
    model, _ = load_for_sampling(run.last, device="cpu")
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert torch.equal(model.state_dict()[f"{key}.base_layer.weight"], base_sd[f"{key}.weight"])
    assert model.state_dict()[f"{key}.lora_B.default.weight"].abs().max() > 0
    # shared as a diffusers-layout file, merged into the base by --lora: the run's own images
    import convert
    from ldm.generation import sample_prompts
    adapter_file = tmp_path / "adapter.safetensors"
    assert convert.main(["--ckpt", str(run.last), "--lora-out", str(adapter_file)]) == 0
    base_model, _ = load_for_sampling(base_file, sorted((tiny_run / "configs").glob("*-project.yaml"))[-1],
                                      device="cpu")
    plain = sample_prompts(base_model, ["a red square"], steps=3, sampler="ddim", scale=2.0, seed=0)
    merge_lora_files(base_model, [str(adapter_file)])
    merged = sample_prompts(base_model, ["a red square"], steps=3, sampler="ddim", scale=2.0, seed=0)
    own = sample_prompts(model, ["a red square"], steps=3, sampler="ddim", scale=2.0, seed=0)
    assert (own - plain).abs().max() > 1e-4 and torch.allclose(merged, own, atol=1e-4), (merged - own).abs().max()
    # a resume continues from the saved step; with another base it is refused before any work
    import main as main_mod
    assert main_mod.main(["-r", str(run.root), "-t", "lightning.trainer.max_steps=4",
                          "lightning.trainer.enable_progress_bar=false"]) == 0
    assert load_checkpoint(run.last, allow_pickle=True)["global_step"] == 4
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"  # another base: one weight changed
    changed = {k: v.contiguous() for k, v in base_sd.items()}
    changed[f"{key}.weight"] = changed[f"{key}.weight"] + 0.01
    save_file(changed, str(other))
    capsys.readouterr()
    assert main_mod.main(["-r", str(run.root), "-t", f"model.params.ckpt_path={other}", "--allow-model-changes",
                          "lightning.trainer.max_steps=5", "lightning.trainer.enable_progress_bar=false"]) == 2
    assert "trained on the base" in capsys.readouterr().err
