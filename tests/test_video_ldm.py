"""The video model kind: an image LDM's checkpoint under a VideoUNet, temporal layers trained, image layers frozen."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm import generation
from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.video import VideoLatentDiffusion, frame_strip, trainable_names
from ldm.util import ConfigError, instantiate_from_config

from _helpers import perturb

T = 3
UNET = dict(in_channels=2, out_channels=2, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1,
            channel_mult=[1, 2], num_head_channels=16, transformer_depth=1, context_dim=32)
AE = dict(embed_dim=2, lossconfig={"target": "torch.nn.Identity"},
          ddconfig=dict(double_z=True, z_channels=2, resolution=32, in_channels=1, out_ch=1, ch=16, ch_mult=[1, 2, 4],
                        num_res_blocks=1, attn_resolutions=[], dropout=0.0, norm_groups=8))


def config(video: bool, ae_path: str, **over) -> OmegaConf:
    unet = ({"target": "ldm.modules.diffusionmodules.video_model.VideoUNet",
             "params": {**UNET, "merge_strategy": "learned_with_images", "merge_factor": 0.0,
                        "extra_ff_mix_layer": True, "use_spatial_context": True, "video_kernel_size": [3, 1, 1]}}
            if video else
            {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
             "params": {**UNET, "image_size": 8, "use_spatial_transformer": True, "legacy": False}})
    params = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000, first_stage_key="video" if video else "image",
                  cond_stage_key="class_label", image_size=8, channels=2, conditioning_key="crossattn",
                  use_ema=True, ema_decay=0.9, unet_config=unet, scale_factor=0.8,
                  first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL",
                                      "params": {**AE, "ckpt_path": ae_path}},
                  cond_stage_config={"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                     "params": {"embed_dim": 32, "n_classes": 4, "key": "class_label",
                                                "add_null_class": True}})
    params.update(over)
    target = "ldm.models.diffusion.video.VideoLatentDiffusion" if video else "ldm.models.diffusion.ddpm.LatentDiffusion"
    return OmegaConf.create({"target": target, "params": params})


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """An autoencoder and a trained-looking (perturbed) image LDM on it, saved as checkpoints."""
    root = tmp_path_factory.mktemp("video_ldm")
    torch.manual_seed(0)
    ae = instantiate_from_config(OmegaConf.create({"target": "ldm.models.autoencoder.AutoencoderKL", "params": AE}))
    ae_path = str(root / "ae.safetensors")
    save_file(ae.state_dict(), ae_path)
    image = instantiate_from_config(config(False, ae_path))
    perturb(image.model, seed=1)
    perturb(image.cond_stage_model, seed=2)
    image.model_ema.reset_to(image.model)
    image_path = str(root / "image.safetensors")
    save_file({k: v.contiguous() for k, v in image.state_dict().items()}, image_path)
    return ae_path, image_path, image.eval()


def video_model(parts, **over) -> VideoLatentDiffusion:
    ae_path, image_path, _ = parts
    torch.manual_seed(0)
    return instantiate_from_config(config(True, ae_path, image_ckpt_path=image_path, **over))


def clips_batch(n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.rand(n, T, 32, 32, 1, generator=g) * 2 - 1, "class_label": torch.arange(n) % 4}


@torch.no_grad()
def test_starts_as_the_image_model_with_only_temporal_weights_new(parts):
    _, _, image = parts
    video = video_model(parts).eval()
    z = torch.randn(2, 2, T, 8, 8)
    t = torch.tensor([30, 700])
    c = video.get_learned_conditioning(torch.tensor([1, 3]))
    out = video.apply_model(z, t, c)
    frames = z.movedim(2, 1).reshape(2 * T, 2, 8, 8)
    ref = image.apply_model(frames, t.repeat_interleave(T), image.get_learned_conditioning(torch.tensor([1, 3]))
                            .repeat_interleave(T, 0))
    assert torch.allclose(out.movedim(2, 1).reshape(2 * T, 2, 8, 8), ref, atol=1e-5, rtol=1e-5)
    # the image weights are the checkpoint's (its EMA weights, here equal to its weights), bit for bit
    sd = image.state_dict()
    own = video.state_dict()
    spatial = [k for k in own if k.startswith("model.diffusion_model.") and not video.unet.is_temporal_key(k)]
    assert spatial and all(torch.equal(own[k], sd[k]) for k in spatial)


def test_trains_only_the_temporal_layers_and_the_ema_follows_them(parts):
    video = video_model(parts)
    names = trainable_names(video)
    assert names and all(video.unet.is_temporal_key(n) for n in names)
    assert set(video.model_ema.m_name2s_name) == set(names)
    frozen = {n: p.detach().clone() for n, p in video.model.named_parameters() if not p.requires_grad}
    opt = video.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple) else opt
    params_before = {n: p.detach().clone() for n, p in video.model.named_parameters() if p.requires_grad}
    video.train()
    for step in range(2):
        loss, _ = video.shared_step(clips_batch(seed=step))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in video.model.named_parameters() if n in frozen)
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in video.model.named_parameters() if n in frozen)
    moved = [n for n, p in video.model.named_parameters() if n in params_before and not torch.equal(p, params_before[n])]
    assert len(moved) > len(params_before) // 2


def test_train_spatial_trains_everything(parts):
    video = video_model(parts, train_spatial=True)
    assert set(trainable_names(video)) == {n for n, _ in video.model.named_parameters()}


@torch.no_grad()
def test_joint_image_and_video_batch(parts):
    _, _, image = parts
    video = video_model(parts).eval()
    perturb(torch.nn.ModuleList(video.unet.temporal_modules()), seed=5)
    batch = clips_batch()
    batch["image_only_indicator"] = torch.tensor([1, 0])
    loss, _ = video.shared_step(batch)
    assert torch.isfinite(loss)
    # the image item is T independent images: the image model's prediction; the video item is not
    z = torch.randn(2, 2, T, 8, 8)
    t = torch.tensor([400, 400])
    c = video.get_learned_conditioning(torch.tensor([2, 2]))
    ind = video.image_only({"image_only_indicator": torch.tensor([1, 0])}, 2, T)
    out = video.apply_model(z, t, video.with_video_inputs(c, ind))
    ref = image.apply_model(z[0].movedim(1, 0), t[:1].expand(T), image.get_learned_conditioning(torch.tensor([2]))
                            .expand(T, -1, -1))
    assert torch.allclose(out[0].movedim(1, 0), ref, atol=1e-5, rtol=1e-5)
    other = image.apply_model(z[1].movedim(1, 0), t[:1].expand(T), image.get_learned_conditioning(torch.tensor([2]))
                              .expand(T, -1, -1))
    assert not torch.allclose(out[1].movedim(1, 0), other, atol=1e-3)


def test_image_items_need_learned_with_images(parts):
    ae_path, image_path, _ = parts
    cfg = config(True, ae_path, image_ckpt_path=image_path)
    cfg.params.unet_config.params.merge_strategy = "learned"
    video = instantiate_from_config(cfg)
    batch = clips_batch()
    batch["image_only_indicator"] = torch.tensor([1, 0])
    with pytest.raises(ConfigError, match="learned_with_images"):
        video.shared_step(batch)
    batch["image_only_indicator"] = torch.zeros(2, T + 1)
    with pytest.raises(Exception, match=r"expected \(2,\) or \(2, 3\)"):
        video.shared_step(batch)


def test_wrong_checkpoints_and_networks_are_refused(parts, tmp_path):
    ae_path, image_path, _ = parts
    video = video_model(parts)
    video_path = str(tmp_path / "video.safetensors")
    save_file({k: v.contiguous() for k, v in video.state_dict().items()}, video_path)
    with pytest.raises((CheckpointError, ConfigError), match="already holds temporal layers"):
        instantiate_from_config(config(True, ae_path, image_ckpt_path=video_path))
    wide = instantiate_from_config(config(False, ae_path, unet_config={
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {**UNET, "model_channels": 64, "image_size": 8, "use_spatial_transformer": True, "legacy": False}}))
    wide_path = str(tmp_path / "wide.safetensors")
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, wide_path)
    with pytest.raises((CheckpointError, ConfigError), match="shape mismatch"):
        instantiate_from_config(config(True, ae_path, image_ckpt_path=wide_path))
    cfg = config(False, ae_path)
    cfg.target = "ldm.models.diffusion.video.VideoLatentDiffusion"
    with pytest.raises(ConfigError, match="needs a VideoUNet"):
        instantiate_from_config(cfg)
    with pytest.raises(Exception, match="clips"):
        video.shared_step({"video": torch.zeros(2, 32, 32, 1), "class_label": torch.tensor([0, 1])})


@torch.no_grad()
def test_sampling_gives_clips_with_one_seed_per_clip(parts):
    video = video_model(parts).eval()
    perturb(torch.nn.ModuleList(video.unet.temporal_modules()), seed=7)
    cond = video.conditioning(labels=[1, 2], guidance=False)
    two = generation.generate(video, cond, 2, steps=3, sampler="ddim", scale=1.0,
                              generator=[torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)])
    assert two.shape == (2, 1, video.num_frames, 32, 32)
    one = generation.generate(video, video.conditioning(labels=[2], guidance=False), 1, steps=3, sampler="ddim",
                              scale=1.0, generator=[torch.Generator().manual_seed(11)])
    assert torch.allclose(two[1:], one, atol=1e-5)
    assert frame_strip(two).shape == (2, 1, 32, 32 * video.num_frames)
    guided = generation.generate(video, video.conditioning(labels=[1, 2]), 2, steps=3, scale=3.0,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(guided).all() and guided.shape == two.shape


def test_image_logger_rows_are_frame_strips(parts):
    video = video_model(parts, num_frames=T)
    log = video.log_images(clips_batch(), N=2, ddim_steps=2)
    assert log["inputs"].shape == (2, 1, 32, 32 * T) and log["samples"].shape == (2, 1, 32, 32 * T)


def test_a_video_run_through_main_resumes_at_its_step(tmp_path):
    """main.py trains the temporal layers of a video model started from an image LDM, on moving shapes (joint image
    + video batches), then resumes at its step; the image layers stay the image model's."""
    import main as main_mod

    torch.manual_seed(0)
    ae_cfg = {**AE, "ddconfig": {**AE["ddconfig"], "in_channels": 3, "out_ch": 3}}
    ae = instantiate_from_config(OmegaConf.create({"target": "ldm.models.autoencoder.AutoencoderKL", "params": ae_cfg}))
    ae_path = str(tmp_path / "ae.safetensors")
    save_file(ae.state_dict(), ae_path)
    classes = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
               "params": {"embed_dim": 32, "n_classes": 18, "key": "class_label", "add_null_class": True}}
    image = instantiate_from_config(config(False, ae_path, cond_stage_config=classes, first_stage_config={
        "target": "ldm.models.autoencoder.AutoencoderKL", "params": {**ae_cfg, "ckpt_path": ae_path}}))
    perturb(image.model, seed=1)
    image.model_ema.reset_to(image.model)  # trained-looking: its EMA weights are its weights
    image_path = str(tmp_path / "image.safetensors")
    save_file({k: v.contiguous() for k, v in image.state_dict().items()}, image_path)
    model = config(True, ae_path, image_ckpt_path=image_path, cond_stage_config=classes, num_frames=T,
                   first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL",
                                       "params": {**ae_cfg, "ckpt_path": ae_path}})
    shapes = {"target": "ldm.data.moving_shapes.MovingShapes", "params": {"size": 32, "frames": T, "num_samples": 8}}
    cfg = OmegaConf.create({
        "model": {"base_learning_rate": 1e-4, **OmegaConf.to_container(model)},
        "data": {"target": "main.DataModuleFromConfig", "params": {
            "batch_size": 2, "num_workers": 0,
            "train": {**shapes, "params": {**shapes["params"], "image_prob": 0.5}},
            "validation": {**shapes, "params": {**shapes["params"], "split": "validation", "num_samples": 2}}}},
        "lightning": {"trainer": {"max_steps": 3, "val_check_interval": 3, "check_val_every_n_epoch": None,
                                  "num_sanity_val_steps": 0, "enable_progress_bar": False},
                      "callbacks": {"image_logger": {"target": "main.ImageLogger", "params": {
                          "batch_frequency": 2, "max_images": 2, "increase_log_steps": False,
                          "log_images_kwargs": {"N": 2, "ddim_steps": 2}}}}}})
    path = tmp_path / "video.yaml"
    OmegaConf.save(cfg, path)
    logs = tmp_path / "logs"
    assert main_mod.main(["--base", str(path), "-t", "-n", "video", "-l", str(logs)]) == 0
    rd = next(logs.glob("*_video"))
    ck = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 3
    assert list((rd / "images" / "train").glob("samples_gs-*.png"))
    key = "model.diffusion_model.input_blocks.1.0.time_stack.in_layers.2.weight"
    t3 = ck["state_dict"][key].clone()
    import time
    time.sleep(max(0.0, 1.05 - (time.time() % 1.0)))  # run files are named by the second (issue 43 renames them)
    assert main_mod.main(["-r", str(rd), "-t", "lightning.trainer.max_steps=5", "-l", str(logs)]) == 0
    ck = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 5 and not torch.equal(t3, ck["state_dict"][key])
    sd = image.state_dict()
    spatial = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(ck["state_dict"][spatial], sd[spatial])


@torch.no_grad()
def test_every_sampler_on_video_latents_with_guidance(parts):
    """Each sampler of the framework on (B, C, T, h, w) clips, classifier-free guided, one generator per clip: the
    second clip of a two-clip run is the single clip of the second seed (no sampler mixes clips)."""
    from ldm.sampling import SAMPLERS
    video = video_model(parts).eval()
    perturb(torch.nn.ModuleList(video.unet.temporal_modules()), seed=8)
    for name in sorted(SAMPLERS):
        two = generation.generate(video, video.conditioning(labels=[0, 3]), 2, steps=3, sampler=name, scale=2.0,
                                  generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
                                  decode=False)
        one = generation.generate(video, video.conditioning(labels=[3]), 1, steps=3, sampler=name, scale=2.0,
                                  generator=[torch.Generator().manual_seed(2)], decode=False)
        assert two.shape == (2, 2, video.num_frames, 8, 8) and torch.isfinite(two).all(), name
        assert torch.allclose(two[1:], one, atol=1e-4), name


def context_model(parts, **over):
    """A video model trained for prediction and interpolation: its UNet reads latents, context latents and mask."""
    ae_path, image_path, _ = parts
    cfg = config(True, ae_path, image_ckpt_path=image_path, num_frames=T,
                 context_frames={"modes": ["none", "predict", "interpolate"], "max_given": 2}, **over)
    cfg.params.unet_config.params.in_channels = 2 * 2 + 1
    torch.manual_seed(0)
    return instantiate_from_config(cfg)


@torch.no_grad()
def test_masked_context_is_used_and_predicted_frames_do_not_leak(parts):
    _, _, image = parts
    video = context_model(parts).eval()
    z = torch.randn(2, 2, T, 8, 8)
    t = torch.tensor([300, 600])
    c = video.get_learned_conditioning(torch.tensor([1, 2]))
    from ldm.models.diffusion.video_context import context_concat, prediction_mask
    mask = prediction_mask(T, 1).expand(2, -1)  # frame 0 given
    ctx = torch.randn(2, 2, T, 8, 8)
    # started from the image model: the widened input channels are zero, so the context changes nothing yet
    out0 = video.apply_model(z, t, video.with_context(c, context_concat(ctx, mask)))
    ref = image.apply_model(z.movedim(2, 1).reshape(2 * T, 2, 8, 8), t.repeat_interleave(T),
                            image.get_learned_conditioning(torch.tensor([1, 2])).repeat_interleave(T, 0))
    assert torch.allclose(out0.movedim(2, 1).reshape(2 * T, 2, 8, 8), ref, atol=1e-5)
    perturb(video.model, seed=9)  # as after training
    base = video.apply_model(z, t, video.with_context(c, context_concat(ctx, mask)))
    changed_context = ctx.clone()
    changed_context[:, :, 0] += 1.0
    assert (video.apply_model(z, t, video.with_context(c, context_concat(changed_context, mask))) - base).abs().max() > 1e-3
    changed_predicted = ctx.clone()
    changed_predicted[:, :, 2] += 1.0  # a frame to predict: its input must not leak into the conditioning
    assert torch.equal(video.apply_model(z, t, video.with_context(c, context_concat(changed_predicted, mask))), base)


def test_context_training_step_and_continuing_clips(parts):
    video = context_model(parts)
    loss, _ = video.shared_step(clips_batch())
    assert torch.isfinite(loss)
    video.eval()
    perturb(torch.nn.ModuleList(video.unet.temporal_modules()), seed=11)
    first = clips_batch()["video"].movedim(-1, 1)  # (B, C, T, H, W)
    longer = video.continue_clips(first, 1, labels=[0, 1], steps=2, scale=2.0,
                                  generator=torch.Generator().manual_seed(0))
    assert longer.shape == (2, 1, T + (T - 1), 32, 32) and torch.equal(longer[:, :, :T], first)
    longest = video.continue_clips(longer, 2, labels=[0, 1], steps=2, scale=1.0)
    assert longest.shape[2] == 2 * T - 1 + T - 2
    with pytest.raises(Exception, match="given 3"):
        video.continue_clips(first, 3, labels=[0, 1], steps=2)
    ae_path, image_path, _ = parts
    bad = config(True, ae_path, image_ckpt_path=image_path, context_frames={"modes": ["predict"]})
    with pytest.raises(ConfigError, match="in_channels is 2"):
        instantiate_from_config(bad)
    bad = config(True, ae_path, context_frames={"modes": ["extrapolate"]})
    with pytest.raises(ConfigError, match="extrapolate"):
        instantiate_from_config(bad)
