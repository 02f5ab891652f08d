"""scripts/txt2video.py on a tiny text-to-video model: MP4, GIF, PNG frames and a frame strip per run; one seed per
clip; bad input refused before any work."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from ldm.data.video_io import probe_video
from ldm.util import instantiate_from_config

from _helpers import perturb
from test_video_ldm import AE, config

pytestmark = pytest.mark.minilm
T = 3


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    """(config path, checkpoint path, image LDM checkpoint) of a tiny text-to-video model with trained-looking weights."""
    root = tmp_path_factory.mktemp("txt2video")
    torch.manual_seed(0)
    ae_cfg = {**AE, "ddconfig": {**AE["ddconfig"], "in_channels": 3, "out_ch": 3}}
    ae = instantiate_from_config(OmegaConf.create({"target": "ldm.models.autoencoder.AutoencoderKL", "params": ae_cfg}))
    ae_path = str(root / "ae.safetensors")
    save_file(ae.state_dict(), ae_path)
    text = {"target": "ldm.modules.encoders.modules.FrozenMiniLMEmbedder", "params": {"max_length": 8}}
    first = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {**ae_cfg, "ckpt_path": ae_path}}
    image_cfg = config(False, ae_path, cond_stage_key="caption", cond_stage_config=text, first_stage_config=first)
    image_cfg.params.unet_config.params.context_dim = 384
    image = instantiate_from_config(image_cfg)
    perturb(image.model, seed=1)
    image.model_ema.reset_to(image.model)
    image_path = str(root / "image.safetensors")
    save_file({k: v.contiguous() for k, v in image.state_dict().items()}, image_path)
    video_cfg = config(True, ae_path, cond_stage_key="caption", cond_stage_config=text, first_stage_config=first,
                       image_ckpt_path=image_path, num_frames=T, guidance_scale=2.0, sample_steps=2)
    video_cfg.params.unet_config.params.context_dim = 384
    video = instantiate_from_config(video_cfg)
    perturb(torch.nn.ModuleList(video.unet.temporal_modules()), seed=3)
    video.model_ema.reset_to(video.model)
    ckpt = root / "video.ckpt"
    torch.save({"state_dict": video.state_dict(), "global_step": 0}, ckpt)
    cfg_path = root / "video-project.yaml"
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.to_container(video_cfg)}), cfg_path)
    # the same model trained with context frames (prediction from a first frame: image-to-video)
    ctx_cfg = OmegaConf.merge(video_cfg, {"params": {"context_frames": {"modes": ["none", "predict"]},
                                                     "unet_config": {"params": {"in_channels": 5}}}})
    ctx = instantiate_from_config(ctx_cfg)
    perturb(ctx.model, seed=5)
    ctx.model_ema.reset_to(ctx.model)
    torch.save({"state_dict": ctx.state_dict(), "global_step": 0}, root / "context.ckpt")
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.to_container(ctx_cfg)}), root / "context-project.yaml")
    return (str(cfg_path), str(ckpt), image_path, (str(root / "image-project.yaml"), image_cfg),
            (str(root / "context-project.yaml"), str(root / "context.ckpt")))


def script(name: str, argv) -> int:
    import importlib.util
    import sys
    from pathlib import Path
    folder = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(folder))  # the video scripts share helpers with their neighbours
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.main(argv)
    finally:
        sys.path.remove(str(folder))


def txt2video(argv):
    return script("txt2video", argv)


def test_clips_written_as_mp4_gif_frames_and_a_strip_with_one_seed_per_clip(video_run, tmp_path):
    cfg, ckpt = video_run[:2]
    base = ["--config", cfg, "--ckpt", ckpt, "--steps", "2", "--prompt", "a small red circle moving left"]
    assert txt2video(base + ["--n_samples", "2", "--seed", "5", "--outdir", str(tmp_path / "a")]) == 0
    clips = tmp_path / "a" / "clips"
    assert sorted(p.name for p in clips.glob("*.mp4")) == ["00000.mp4", "00001.mp4"]
    info = probe_video(clips / "00001.mp4")
    assert (info.frames, info.width, info.height) == (T, 32, 32) and info.fps == pytest.approx(8)
    assert (clips / "00000.gif").is_file() and len(list((clips / "00001").glob("*.png"))) == T
    strip = Image.open(tmp_path / "a" / "strip-0000.png")
    assert strip.height > 2 * 32 and strip.width >= T * 32
    meta = Image.open(clips / "00001" / "002.png").text
    assert meta["seed"] == "6" and meta["prompt"] == "a small red circle moving left" and meta["frame"] == "2"
    # clip 1 of seed 5 is clip 0 of seed 6
    assert txt2video(base + ["--n_samples", "1", "--seed", "6", "--outdir", str(tmp_path / "b")]) == 0
    for t in range(T):
        a = np.asarray(Image.open(clips / "00001" / f"{t:03}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / "clips" / "00000" / f"{t:03}.png"))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # numbering continues: a second run never replaces a clip
    assert txt2video(base + ["--n_samples", "1", "--outdir", str(tmp_path / "a"), "--frames", "2"]) == 0
    assert probe_video(clips / "00002.mp4").frames == 2 and (tmp_path / "a" / "strip-0001.png").is_file()


def test_bad_input_refused_before_work(video_run, tmp_path, capsys):
    cfg, ckpt, image_path, (image_cfg_path, image_cfg) = video_run[:4]
    assert txt2video(["--config", cfg, "--ckpt", ckpt, "--frames", "0", "--outdir", str(tmp_path)]) != 0
    assert "--frames 0" in capsys.readouterr().err
    assert txt2video(["--config", cfg, "--ckpt", ckpt, "--fps", "-1", "--outdir", str(tmp_path)]) != 0
    assert "--fps" in capsys.readouterr().err
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.to_container(image_cfg)}), image_cfg_path)
    assert txt2video(["--config", image_cfg_path, "--ckpt", image_path, "--outdir", str(tmp_path / "img")]) != 0
    assert "not a video model" in capsys.readouterr().err
    assert not (tmp_path / "img" / "clips").exists() or not any((tmp_path / "img" / "clips").iterdir())


def test_img2video_starts_from_the_image(video_run, tmp_path, capsys):
    cfg, ckpt = video_run[:2]
    ctx_cfg, ctx_ckpt = video_run[4]
    rng = np.random.default_rng(0)
    first = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(first).save(tmp_path / "first.png")
    args = ["--init-img", str(tmp_path / "first.png"), "--prompt", "a small red circle moving right", "--steps", "2"]
    assert script("img2video", args + ["--config", ctx_cfg, "--ckpt", ctx_ckpt, "--n_samples", "2",
                                       "--outdir", str(tmp_path / "out")]) == 0
    clips = tmp_path / "out" / "clips"
    assert probe_video(clips / "00001.mp4").frames == T and len(list((clips / "00000").glob("*.png"))) == T
    assert np.array_equal(np.asarray(Image.open(clips / "00000" / "000.png")), first)  # the given frame, as given
    assert (tmp_path / "out" / "strip-0000.png").is_file()
    assert script("img2video", args + ["--config", cfg, "--ckpt", ckpt, "--outdir", str(tmp_path / "x")]) != 0
    assert "not trained with context frames" in capsys.readouterr().err
    assert script("img2video", args + ["--config", ctx_cfg, "--ckpt", ctx_ckpt, "--motion", "127",
                                       "--outdir", str(tmp_path / "y")]) != 0
    assert "no motion input" in capsys.readouterr().err
    assert script("img2video", ["--init-img", str(tmp_path / "missing.png"), "--config", ctx_cfg, "--ckpt", ctx_ckpt,
                                "--outdir", str(tmp_path / "z")]) != 0
    assert "missing.png" in capsys.readouterr().err
