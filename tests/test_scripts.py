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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from safetensors.torch import save_file
    from ldm.util import instantiate_from_config, load_config
    tmp = tmp_path_factory.mktemp("run")
    ae = instantiate_from_config(load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml").model)
    save_file(ae.state_dict(), str(tmp / "ae.safetensors"))
    rc = main_mod.main(["--base", str(ROOT / "configs/ldm/shapes_txt2img.yaml"), "-t", "-n", "tiny", "-l", str(tmp),
                        f"model.params.first_stage_config.params.ckpt_path={tmp / 'ae.safetensors'}",
                        "model.params.unet_config.params.model_channels=32",
                        "model.params.unet_config.params.num_head_channels=16", "data.params.batch_size=4",
                        "data.params.train.params.dataset.params.num_samples=16",
                        f"data.params.train.params.cache_dir={tmp / 'cache'}", "data.params.validation.params.num_samples=4",
                        "lightning.trainer.max_steps=2", "lightning.trainer.enable_progress_bar=false"])
    assert rc == 0
    return Path(glob.glob(str(tmp / "*_tiny"))[0])


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
    assert txt2img.main(["--ckpt", str(tiny_run / "checkpoints/last.ckpt"), "--H", "64", "--W", "64"]) == 2


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
    assert len(list((out / "img").glob("*.png"))) == 5
    import numpy as np
    data = np.load(out / "5x32x32x3-samples.npz")["arr_0"]
    assert data.shape == (5, 32, 32, 3) and data.dtype == np.uint8


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
