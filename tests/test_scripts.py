"""Sampling scripts end to end on a tiny text-to-image run: file order, metadata, grid, samplers."""
from __future__ import annotations

import glob
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main as main_mod

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import txt2img  # noqa: E402


def test_txt2img_from_file_order_metadata_and_grid(tiny_run, tmp_path):
    prompts = ["a small red circle in the center", "a large blue square in the top left",
               "a small green triangle in the bottom right"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    rc = txt2img.main(["--ckpt", str(ckpt), "--from-file", str(tmp_path / "p.txt"), "--n_samples", "1",
                       "--ddim_steps", "3", "--outdir", str(out), "--scale", "2.0", "--sampler", "dpmpp_2m"])
    assert rc == 0
    files = sorted((out / "samples").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
    for f, p in zip(files, prompts):
        meta = Image.open(f).text
        assert meta["prompt"] == p and meta["sampler"] == "dpmpp_2m" and meta["steps"] == "3"
        assert meta["scale"] == "2.0" and len(meta["ckpt_sha256"]) == 10 and "seed" in meta
    assert (out / "grid-0000.png").is_file()
    # a second call continues the numbering; --plms picks PLMS
    assert txt2img.main(["--ckpt", str(ckpt), "--prompt", prompts[0], "--n_samples", "2", "--ddim_steps", "3",
                         "--outdir", str(out), "--plms"]) == 0
    assert (out / "samples" / "00004.png").is_file() and Image.open(out / "samples" / "00004.png").text["sampler"] == "plms"


def test_txt2img_same_seed_same_image(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    for d in ("a", "b"):
        assert txt2img.main(["--ckpt", str(ckpt), "--n_samples", "1", "--ddim_steps", "2", "--outdir",
                             str(tmp_path / d), "--seed", "5"]) == 0
    a = torch.tensor(list(Image.open(tmp_path / "a/samples/00000.png").getdata()))
    b = torch.tensor(list(Image.open(tmp_path / "b/samples/00000.png").getdata()))
    assert torch.equal(a, b)


def test_txt2img_bad_input(tiny_run, tmp_path, capsys):
    assert txt2img.main(["--ckpt", str(tmp_path / "missing.ckpt"), "--config",
                         str(ROOT / "configs/ldm/shapes_txt2img.yaml")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    capsys.readouterr()
    assert txt2img.main(["--ckpt", str(tiny_run / "checkpoints/last.ckpt"), "--H", "62"]) == 2
    assert "--H 62 is not a positive multiple of the first stage's downsampling factor 4" in capsys.readouterr().err
    assert txt2img.main(["--ckpt", str(tiny_run / "checkpoints/last.ckpt"), "--f", "8"]) == 2
    assert "downsamples by 4" in capsys.readouterr().err


def test_img2img_strength(tiny_run, tmp_path, capsys):
    import img2img
    from ldm.data.shapes import ShapesDataset
    arr = ((ShapesDataset(num_samples=1)[0]["image"] + 1) * 127.5).round().astype("uint8")
    Image.fromarray(arr).save(tmp_path / "in.png")
    ckpt = str(tiny_run / "checkpoints" / "last.ckpt")
    assert img2img.main(["--init-img", str(tmp_path / "in.png"), "--prompt", "a large red circle in the center",
                         "--strength", "0.5", "--ddim_steps", "4", "--ckpt", ckpt, "--outdir", str(tmp_path / "o"),
                         "--n_samples", "1"]) == 0
    assert Image.open(tmp_path / "o/samples/00000.png").text["strength"] == "0.5"
    Image.fromarray(arr).resize((50, 34)).save(tmp_path / "odd.png")  # cropped down to multiples of f = 4
    assert img2img.main(["--init-img", str(tmp_path / "odd.png"), "--prompt", "a red circle", "--strength", "0.5",
                         "--ddim_steps", "4", "--ckpt", ckpt, "--outdir", str(tmp_path / "o"), "--n_samples", "1"]) == 0
    assert Image.open(tmp_path / "o/samples/00001.png").size == (48, 32)
    assert img2img.main(["--init-img", str(tmp_path / "in.png"), "--prompt", "a red circle", "--strength", "0.5",
                         "--ddim_steps", "4", "--ckpt", ckpt, "--outdir", str(tmp_path / "o"), "--n_samples", "1",
                         "--H", "40", "--W", "24"]) == 0
    assert Image.open(tmp_path / "o/samples/00002.png").size == (24, 40)
    assert img2img.main(["--init-img", str(tmp_path / "in.png"), "--prompt", "x", "--strength", "0", "--ckpt", ckpt]) == 2


def test_sample_diffusion_unconditional(tmp_path):
    import sample_diffusion
    from safetensors.torch import save_file
    from ldm.util import instantiate_from_config, load_config
    ae = instantiate_from_config(load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml").model)
    save_file(ae.state_dict(), str(tmp_path / "ae.safetensors"))
    assert main_mod.main(["--base", str(ROOT / "configs/ldm/shapes_uncond.yaml"), "-t", "-n", "unc", "-l", str(tmp_path),
                          f"model.params.first_stage_config.params.ckpt_path={tmp_path / 'ae.safetensors'}",
                          "model.params.unet_config.params.model_channels=32", "data.params.batch_size=4",
                          "data.params.train.params.num_samples=8", "data.params.validation.params.num_samples=4",
                          "lightning.trainer.max_steps=1", "lightning.trainer.enable_progress_bar=false"]) == 0
    run = Path(glob.glob(str(tmp_path / "*_unc"))[0])
    out = tmp_path / "samples"
    assert sample_diffusion.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "-n", "5", "--batch_size", "3",
                                  "--custom_steps", "3", "-l", str(out), "--sampler", "heun"]) == 0
    # CompVis layout: <-l>/<run name>/samples/<global step:08>/<date-time>/{img,numpy}
    (stamp,) = (out / run.name / "samples" / "00000001").iterdir()
    assert sorted(p.name for p in (stamp / "img").glob("*.png")) == [f"sample_{i:06}.png" for i in range(5)]
    import numpy as np
    data = np.load(stamp / "numpy" / "5x32x32x3-samples.npz")["arr_0"]
    assert data.shape == (5, 32, 32, 3) and data.dtype == np.uint8
    assert (stamp / "sampling_config.yaml").is_file()
    # -r with the run's log directory finds checkpoints/last.ckpt and configs/*-project.yaml; no -l: inside the run
    assert sample_diffusion.main(["-r", str(run), "-n", "2", "-c", "2", "-e", "0.0", "--batch_size", "2"]) == 0
    (stamp,) = (run / "samples" / "00000001").iterdir()
    assert len(list((stamp / "img").glob("*.png"))) == 2
    # the CompVis model-zoo layout: <dir>/model.ckpt + <dir>/config.yaml, with a dot-list override
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    import shutil
    shutil.copy(run / "checkpoints/last.ckpt", zoo / "model.ckpt")
    shutil.copy(sorted((run / "configs").glob("*-project.yaml"))[-1], zoo / "config.yaml")
    assert sample_diffusion.main(["-r", str(zoo), "-n", "1", "-c", "2", "--batch_size", "1",
                                  "model.params.sample_steps=7"]) == 0
    assert len(list((zoo / "samples").glob("*/*/img/*.png"))) == 1
    assert sample_diffusion.main(["-r", str(tmp_path / "nowhere"), "-n", "1"]) == 2
    assert sample_diffusion.main(["-r", str(zoo), "-n", "1", "--sampler", "heun", "-e", "0.5"]) == 2  # heun: no eta
    assert sample_diffusion.main(["-r", str(zoo), "-n", "1", "not-an-override"]) == 2


def test_txt2img_device_and_reduced_precision(tiny_run, tmp_path):
    """--device picks the device; --precision bf16 samples under autocast and gives images close to float32 ones."""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    for d, prec in (("fp32", "fp32"), ("bf16", "bf16")):
        assert txt2img.main(["--ckpt", str(ckpt), "--n_samples", "1", "--ddim_steps", "3", "--outdir",
                             str(tmp_path / d), "--seed", "5", "--device", "cpu", "--precision", prec]) == 0
    a = torch.tensor(list(Image.open(tmp_path / "fp32/samples/00000.png").getdata())).float()
    b = torch.tensor(list(Image.open(tmp_path / "bf16/samples/00000.png").getdata())).float()
    assert (a - b).abs().mean() < 8  # same picture up to bf16 rounding (0-255 scale)
    with pytest.raises(SystemExit):
        txt2img.get_parser().parse_args(["--ckpt", "x", "--precision", "fp8"])


# --- issue 14: any size, every CompVis / SD flag, output numbering, seeds ------------------------------------

def _pixels(path) -> torch.Tensor:
    return torch.from_numpy(__import__("numpy").asarray(Image.open(path))).int()


def test_txt2img_non_native_size_and_readable_grid(tiny_run, tmp_path):
    """1.5x the native width (latent 8x12, not a multiple of the UNet's factor) gives images of that size."""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "o"
    assert txt2img.main(["--ckpt", str(ckpt), "--W", "48", "--n_samples", "2", "--ddim_steps", "2", "--outdir", str(out),
                         "--grid_upscale", "4", "--grid_captions", "--prompt", "a small red circle"]) == 0
    for f in sorted((out / "samples").glob("*.png")):
        assert Image.open(f).size == (48, 32) and Image.open(f).text["W"] == "48"
    w, h = Image.open(out / "grid-0000.png").size
    assert w >= 2 * 48 * 4 and h > 32 * 4  # enlarged tiles, caption strip below them
    assert txt2img.main(["--ckpt", str(ckpt), "--H", "64", "--W", "40", "--n_samples", "1", "--ddim_steps", "2",
                         "--outdir", str(out), "--skip_grid"]) == 0
    assert Image.open(out / "samples" / "00002.png").size == (40, 64)
    assert not (out / "grid-0001.png").exists()


def test_txt2img_numbering_continues_and_never_overwrites(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "o"
    args = ["--ckpt", str(ckpt), "--n_samples", "2", "--ddim_steps", "2", "--outdir", str(out)]
    assert txt2img.main(args) == 0 and txt2img.main(args + ["--seed", "7"]) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"{i:05}.png" for i in range(4)]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    (out / "samples" / "00001.png").unlink()  # a gap: counting files would overwrite 00003.png
    before = _pixels(out / "samples" / "00003.png")
    assert txt2img.main(args + ["--skip_grid"]) == 0
    assert torch.equal(_pixels(out / "samples" / "00003.png"), before)
    assert (out / "samples" / "00005.png").is_file()


def test_txt2img_seed_gives_the_same_images_whatever_the_split(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    common = ["--ckpt", str(ckpt), "--ddim_steps", "3", "--seed", "11", "--skip_grid", "--prompt", "a blue square"]
    assert txt2img.main(common + ["--n_samples", "1", "--n_iter", "4", "--outdir", str(tmp_path / "a")]) == 0
    assert txt2img.main(common + ["--n_samples", "4", "--outdir", str(tmp_path / "b")]) == 0
    assert txt2img.main(common + ["--n_samples", "2", "--n_iter", "2", "--outdir", str(tmp_path / "c")]) == 0
    for i in range(4):
        a = _pixels(tmp_path / f"a/samples/{i:05}.png")
        assert (a - _pixels(tmp_path / f"b/samples/{i:05}.png")).abs().max() <= 1  # batch-size dependent kernels
        assert (a - _pixels(tmp_path / f"c/samples/{i:05}.png")).abs().max() <= 1  # round at most one level apart
    assert not torch.equal(_pixels(tmp_path / "a/samples/00000.png"), _pixels(tmp_path / "a/samples/00001.png"))


def test_txt2img_fixed_code_reuses_the_start_code(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    common = ["--ckpt", str(ckpt), "--ddim_steps", "3", "--n_samples", "2", "--n_iter", "2", "--skip_grid"]
    assert txt2img.main(common + ["--fixed_code", "--outdir", str(tmp_path / "f")]) == 0
    assert torch.equal(_pixels(tmp_path / "f/samples/00000.png"), _pixels(tmp_path / "f/samples/00002.png"))
    assert not torch.equal(_pixels(tmp_path / "f/samples/00000.png"), _pixels(tmp_path / "f/samples/00001.png"))
    assert txt2img.main(common + ["--outdir", str(tmp_path / "n")]) == 0
    assert not torch.equal(_pixels(tmp_path / "n/samples/00000.png"), _pixels(tmp_path / "n/samples/00002.png"))


def test_txt2img_from_file_batches_and_repeat(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    prompts = ["a red circle", "a blue square", "a green triangle"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "o"
    assert txt2img.main(["--ckpt", str(ckpt), "--from-file", str(tmp_path / "p.txt"), "--n_samples", "4",
                         "--repeat", "2", "--ddim_steps", "2", "--outdir", str(out)]) == 0
    got = [Image.open(f).text["prompt"] for f in sorted((out / "samples").glob("*.png"))]
    assert got == [p for p in prompts for _ in range(2)]


TXT2IMG_FLAGS = [  # CompVis / SD v1 txt2img
    ["--prompt", "x"], ["--outdir", "o"], ["--skip_grid"], ["--skip_save"], ["--ddim_steps", "5"], ["--plms"],
    ["--dpm_solver"], ["--fixed_code"], ["--ddim_eta", "0.5"], ["--n_iter", "2"], ["--H", "64"], ["--W", "64"],
    ["--C", "4"], ["--f", "8"], ["--n_samples", "2"], ["--n_rows", "2"], ["--scale", "7.5"], ["--from-file", "p.txt"],
    ["--config", "c.yaml"], ["--ckpt", "m.ckpt"], ["--seed", "1"], ["--precision", "full"],
    ["--precision", "autocast"], ["--laion400m"],
    # SD v2 txt2img
    ["--steps", "5"], ["--dpm"], ["--repeat", "2"], ["--device", "cpu"], ["--bf16"], ["--torchscript"], ["--ipex"],
    # ours
    ["--sampler", "heun"], ["--spacing", "karras"], ["--grid_upscale", "4"], ["--grid_captions"],
]
IMG2IMG_FLAGS = [["--init-img", "in.png"], ["--strength", "0.5"]] + [f for f in TXT2IMG_FLAGS if f[0] != "--laion400m"]
SAMPLE_DIFFUSION_FLAGS = [
    ["-r", "logs/x"], ["--resume", "logs/x"], ["-n", "4"], ["--n_samples", "4"], ["-e", "0.0"], ["--eta", "0.0"],
    ["-v"], ["--vanilla_sample"], ["-c", "20"], ["--custom_steps", "20"], ["-l", "out"], ["--logdir", "out"],
    ["--batch_size", "2"], ["--sampler", "heun"], ["--spacing", "karras"], ["--device", "cpu"], ["--seed", "3"],
    ["--ckpt", "m.ckpt"], ["--config", "c.yaml"], ["--H", "64"], ["--W", "64"],
]


def _dest(parser, flag):
    return next(a.dest for a in parser._actions if flag in a.option_strings)


@pytest.mark.parametrize("script,flags", [("txt2img", TXT2IMG_FLAGS), ("img2img", IMG2IMG_FLAGS),
                                          ("sample_diffusion", SAMPLE_DIFFUSION_FLAGS)])
def test_every_original_flag_is_accepted(script, flags):
    mod = __import__(script)
    parser = mod.get_parser()
    base = ["--init-img", "in.png"] if script == "img2img" else []
    for flag in flags:
        opt = parser.parse_args(base + flag)
        value = getattr(opt, _dest(parser, flag[0]))
        expected = True if len(flag) == 1 else type(value)(flag[1])
        assert value == expected, (flag, value)
    if script != "sample_diffusion":  # one option under two names, as the two originals spell it
        assert parser.parse_args(base + ["--steps", "7"]).steps == parser.parse_args(base + ["--ddim_steps", "7"]).steps


@pytest.mark.parametrize("flag", ["--torchscript", "--ipex"])
def test_sd2_only_flags_are_refused_with_a_message(flag, tiny_run, capsys):
    assert txt2img.main(["--ckpt", str(tiny_run / "checkpoints/last.ckpt"), flag]) == 2
    assert f"{flag} " in capsys.readouterr().err


def test_sampler_flags_pick_the_original_samplers_and_conflicts_are_errors():
    from ldm.cli import DPM_SOLVER, UsageError, precision, sampler_name
    p = txt2img.get_parser()
    assert sampler_name(p.parse_args([])) == "ddim"
    assert sampler_name(p.parse_args(["--plms"])) == "plms"
    assert sampler_name(p.parse_args(["--dpm"])) == sampler_name(p.parse_args(["--dpm_solver"])) == DPM_SOLVER
    assert sampler_name(p.parse_args(["--plms", "--sampler", "plms"])) == "plms"
    with pytest.raises(UsageError, match="conflicting"):
        sampler_name(p.parse_args(["--plms", "--dpm"]))
    assert precision(p.parse_args(["--bf16"])).value == "bf16"
    assert precision(p.parse_args(["--precision", "full"])).value == "full"


def test_progress_bar_epoch_total_under_max_steps_and_max_time():
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import Timer

    from ldm.callbacks import epoch_description
    t = SimpleNamespace(max_epochs=-1, max_steps=1000, num_training_batches=300, accumulate_grad_batches=1,
                        callbacks=[])
    assert epoch_description(t, 0) == "Epoch 0/3"  # 4 epochs of 300 batches hold 1000 steps
    t.accumulate_grad_batches = 2  # 150 optimizer steps per epoch -> 7 epochs
    assert epoch_description(t, 2) == "Epoch 2/6"
    t.max_epochs = 3
    assert epoch_description(t, 1) == "Epoch 1/2"
    t = SimpleNamespace(max_epochs=-1, max_steps=-1, num_training_batches=10, accumulate_grad_batches=1,
                        callbacks=[Timer(duration={"minutes": 14, "seconds": 30})])
    assert epoch_description(t, 5) == "Epoch 5 (stops after 0:14:30)"


def test_main_installs_the_bounded_progress_bar(tmp_path):
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import ProgressBar
    cfg = OmegaConf.create({"trainer": {"max_steps": 5}})
    kw = main_mod.build_trainer_kwargs(cfg, OmegaConf.create({}), object(), str(tmp_path), str(tmp_path / "c"),
                                       str(tmp_path / "g"), "now", False)
    bars = [c for c in kw["callbacks"] if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and "Bounded" in type(bars[0]).__name__
    cfg = OmegaConf.create({"trainer": {"max_steps": 5, "enable_progress_bar": False}})
    kw = main_mod.build_trainer_kwargs(cfg, OmegaConf.create({}), object(), str(tmp_path), str(tmp_path / "c"),
                                       str(tmp_path / "g"), "now", False)
    assert not any(isinstance(c, ProgressBar) for c in kw["callbacks"])


def test_sd_v1_config_samples_at_a_non_native_size(tmp_path, monkeypatch):
    """The reported case: an SD-v1-layout model (v1-inference.yaml at tiny width, its CLIP text encoder found in the
    Hugging Face cache) sampled by txt2img at 64x96 instead of its native 512x512."""
    from omegaconf import OmegaConf

    from _helpers import tiny_sd_v1_config
    from ldm.util import instantiate_from_config
    cfg = tiny_sd_v1_config(tmp_path, monkeypatch)
    OmegaConf.save(cfg, tmp_path / "v1-tiny.yaml")
    model = instantiate_from_config(cfg.model)
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, tmp_path / "sd.ckpt")
    out = tmp_path / "out"
    args = ["--config", str(tmp_path / "v1-tiny.yaml"), "--ckpt", str(tmp_path / "sd.ckpt"), "--prompt", "a lighthouse",
            "--n_samples", "1", "--ddim_steps", "2", "--outdir", str(out), "--plms"]
    assert txt2img.main(args + ["--H", "64", "--W", "96"]) == 0
    img = Image.open(out / "samples" / "00000.png")
    assert img.size == (96, 64) and img.text["scale"] == "7.5"  # SD v1's default guidance without a config value
    assert txt2img.main(args + ["--H", "60"]) == 2


@pytest.mark.parametrize("script", ["inpaint", "superres"])
def test_inpaint_and_superres_take_the_same_sampler_flags(script, tmp_path, capsys):
    mod = __import__(script)
    from ldm.cli import DPM_SOLVER, sampler_name
    p = mod.get_parser()
    base = ["--indir", "in", "--outdir", "out"]
    assert p.parse_args(base + ["--ddim_steps", "7"]).steps == p.parse_args(base + ["--steps", "7"]).steps == 7
    assert sampler_name(p.parse_args(base + ["--plms"])) == "plms"
    assert sampler_name(p.parse_args(base + ["--dpm"])) == sampler_name(p.parse_args(base + ["--dpm_solver"])) == DPM_SOLVER
    assert mod.main(base + ["--plms", "--sampler", "heun"]) == 2
    assert "conflicting sampler flags" in capsys.readouterr().err


def tiny_vq_ldm() -> torch.nn.Module:
    """An unconditional LDM on a tiny VQ first stage (the layout of the paper's LSUN / CelebA-HQ / FFHQ models)."""
    from _helpers import perturb
    from ldm.util import instantiate_from_config
    dd = dict(double_z=False, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=16, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], norm_groups=8)
    cfg = {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "timesteps": 1000, "image_size": 16, "channels": 4, "first_stage_key": "image",
        "cond_stage_config": "__is_unconditional__", "cond_stage_trainable": False,
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                               "params": {"ddconfig": dd, "lossconfig": None, "n_embed": 16, "embed_dim": 4}},
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": {"image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                                   "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
                                   "num_head_channels": 16}}}}
    model = instantiate_from_config(cfg)
    perturb(model, seed=1)
    return model.eval()


def test_img2img_on_a_vq_based_ldm():
    """img2img took torch's statistical `.mode()` of the VQ encoder's tensor and failed on every VQ-based model."""
    from ldm.generation import img2img
    from ldm.modules.model_inputs import Encoding
    model = tiny_vq_ldm()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode_latents(x), model.scale_factor * model.first_stage_model.encode(x))
        assert torch.equal(model.encode_latents(x, Encoding.SAMPLE), model.encode_latents(x))  # VQ: no posterior
    out = img2img(model, x, ["", ""], strength=0.5, steps=4, sampler="ddim", scale=1.0, seed=[0, 1])
    assert out.shape == x.shape and torch.isfinite(out).all()
    again = img2img(model, x, ["", ""], strength=0.5, steps=4, sampler="ddim", scale=1.0, seed=[0, 1])
    assert torch.equal(out, again)
