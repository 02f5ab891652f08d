"""Bad input through the real entry points (main.py and the scripts): outputs never replace inputs, a refused or
failed command leaves inputs and runs byte-identical, every refusal exits non-zero naming the culprit, and every
image is read the same way."""
from __future__ import annotations

import glob
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main as main_mod

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import convert  # noqa: E402
import evaluate  # noqa: E402
import img2img  # noqa: E402
import inpaint  # noqa: E402
import sample_diffusion  # noqa: E402
import superres  # noqa: E402
import txt2img  # noqa: E402

AE_CFG = str(ROOT / "configs/autoencoder/shapes_kl_f4.yaml")
TINY_AE = ["model.params.ddconfig.ch=8", "model.params.ddconfig.ch_mult=[1,2]", "model.params.lossconfig.params.disc_ndf=8",
           "data.params.batch_size=4", "data.params.train.params.num_samples=32",
           "data.params.validation.params.num_samples=8", "lightning.trainer.val_check_interval=2",
           "lightning.callbacks.image_logger.params.batch_frequency=100", "lightning.trainer.enable_progress_bar=false"]


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself), by relative path."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root) if root.is_dir() else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def refused(capsys, *names: str) -> str:
    """stderr of a refused command: it names every one of `names` and is a message, not a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for n in names:
        assert n in err, (n, err)
    return err


def png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory) -> Path:
    """A tiny autoencoder run trained to its max_steps of 2 through main.py (tests copy it before changing it)."""
    logs = tmp_path_factory.mktemp("ae_logs")
    assert main_mod.main(["--base", AE_CFG, "-t", "-n", "ae", "-l", str(logs), "lightning.trainer.max_steps=2"]
                         + TINY_AE) == 0
    return Path(glob.glob(str(logs / "*_ae"))[0])


@pytest.fixture
def run_copy(ae_run, tmp_path) -> Path:
    dst = tmp_path / ae_run.name
    shutil.copytree(ae_run, dst)
    return dst


# ---------------------------------------------------------------- outputs never overwrite inputs or results

def inpaint_inputs(folder: Path, size: int = 32, mask_size: int | None = None, name: str = "a") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    img = np.zeros((size, size, 3), np.uint8)
    img[4:12, 4:12] = (200, 30, 30)
    png(folder / f"{name}.png", img)
    m = mask_size or size
    mask = np.zeros((m, m), np.uint8)
    mask[m // 2:, m // 2:] = 255
    png(folder / f"{name}_mask.png", mask)
    return folder


def inpaint_args(indir: Path, outdir: Path, tiny_run: Path) -> list[str]:
    return ["--indir", str(indir), "--outdir", str(outdir), "--ckpt", str(tiny_run / "checkpoints/last.ckpt"),
            "--prompt", "a red square", "--steps", "2"]


def test_inpaint_refuses_an_outdir_holding_its_inputs_and_existing_results(tiny_run, tmp_path, capsys):
    d = inpaint_inputs(tmp_path / "in")
    before = hashes(d)
    assert inpaint.main(inpaint_args(d, d, tiny_run)) == 2
    refused(capsys, "--outdir", "a.png", "is the input")
    assert hashes(d) == before
    out = tmp_path / "out"
    assert inpaint.main(inpaint_args(d, out, tiny_run)) == 0
    first = hashes(out)
    assert list(first) == ["a.png"]
    assert inpaint.main(inpaint_args(d, out, tiny_run)) == 2  # the earlier result stays
    refused(capsys, "exist already", "--overwrite")
    assert hashes(out) == first and hashes(d) == before
    assert inpaint.main(inpaint_args(d, out, tiny_run) + ["--seed", "7", "--overwrite"]) == 0
    assert hashes(out) != first and not list(out.glob(".*partial*"))


def test_superres_refuses_two_inputs_with_one_output_name(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    png(d / "x.png", np.zeros((8, 8, 3), np.uint8))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "x.jpg")
    assert superres.main(["--indir", str(d), "--outdir", str(tmp_path / "out"), "--ckpt", str(tmp_path / "m.ckpt")]) == 2
    refused(capsys, "two results would be written to", "x.png")
    assert superres.main(["--indir", str(d), "--outdir", str(d), "--ckpt", str(tmp_path / "m.ckpt")]) == 2
    refused(capsys, "is the input")


def test_convert_never_writes_over_its_input_or_an_existing_file(tiny_run, tmp_path, capsys):
    src = tmp_path / "m.ckpt"
    shutil.copy(tiny_run / "checkpoints/last.ckpt", src)
    before = hashes(src)
    assert convert.main(["--ckpt", str(src), "--out", str(src)]) == 2
    refused(capsys, "--out", "is the input")
    link = tmp_path / "link.ckpt"
    link.symlink_to(src)
    assert convert.main(["--ckpt", str(src), "--out", str(link)]) == 2  # resolves to the input
    refused(capsys, "is the input")
    assert hashes(src) == before
    out = tmp_path / "m.safetensors"
    assert convert.main(["--ckpt", str(src), "--out", str(out), "--dtype", "fp16"]) == 0
    first = hashes(out)
    assert convert.main(["--ckpt", str(src), "--out", str(out)]) == 2
    refused(capsys, "exist already", "--overwrite")
    assert hashes(out) == first
    assert convert.main(["--ckpt", str(src), "--out", str(out), "--overwrite"]) == 0
    assert hashes(out) != first and hashes(src) == before


def test_abbreviated_flags_are_refused(tmp_path, capsys):
    """`convert.py --to onnx` used to be read as --to-diffusers onnx and wrote a diffusers folder named onnx."""
    with pytest.raises(SystemExit) as e:
        convert.main(["--ckpt", str(tmp_path / "m.ckpt"), "--to", str(tmp_path / "onnx")])
    assert e.value.code == 2 and not (tmp_path / "onnx").exists()
    assert "unrecognized arguments: --to" in capsys.readouterr().err
    for module in (txt2img, img2img, inpaint, superres, convert, evaluate, sample_diffusion, main_mod):
        assert module.get_parser().allow_abbrev is False, module.__name__


def test_save_png_leaves_no_half_file(tmp_path, monkeypatch):
    from ldm.files import save_png
    real_save = Image.Image.save

    def interrupted(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.png", {"k": "v"})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Image.Image, "save", real_save)
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.png", {"k": "v"})
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"] and Image.open(tmp_path / "x.png").text == {"k": "v"}


# ---------------------------------------------------------------- runs are restored whole and never damaged

def test_resume_that_changes_the_model_is_refused_and_the_run_is_untouched(run_copy, tmp_path, capsys):
    before = hashes(run_copy)
    args = ["-r", str(run_copy), "-t", "lightning.trainer.max_steps=4", "model.params.ddconfig.ch=16"]
    assert main_mod.main(args + ["-l", str(tmp_path)]) == 2
    refused(capsys, "model.params.ddconfig.ch: 8 -> 16", "--allow-model-changes")
    assert hashes(run_copy) == before
    # accepted by the flag, the checkpoint still has to fit: it does not, and the run stays as it was
    assert main_mod.main(args + ["--allow-model-changes", "-l", str(tmp_path)]) == 2
    refused(capsys, "shape mismatch", "last.ckpt")
    assert hashes(run_copy) == before


def test_finished_run_is_not_trained_on_and_a_resume_keeps_the_trainer_settings(run_copy, tmp_path, capsys):
    before = hashes(run_copy)
    assert main_mod.main(["-r", str(run_copy), "-t", "-l", str(tmp_path)]) == 0
    assert "has finished training" in capsys.readouterr().out
    assert hashes(run_copy) == before
    rows = (run_copy / "csv/metrics.csv").read_text().splitlines()
    assert main_mod.main(["-r", str(run_copy), "-t", "lightning.trainer.max_steps=4", "-l", str(tmp_path)]) == 0
    ck = torch.load(run_copy / "checkpoints/last.ckpt", weights_only=True)
    assert ck["global_step"] == 4
    newest = sorted((run_copy / "configs").glob("*-lightning.yaml"))[-1].read_text()
    assert "val_check_interval: 2" in newest and "max_steps: 4" in newest  # the run's settings, then the override
    after = (run_copy / "csv/metrics.csv").read_text().splitlines()
    old_rows = set(rows[1:])
    assert len(after) > len(rows)
    # the first run's metrics are all kept (rows may gain empty columns when a new metric appears)
    header, new_header = rows[0].split(","), after[0].split(",")
    kept = {",".join(dict(zip(new_header, r.split(","))).get(h, "") for h in header) for r in after[1:]}
    assert old_rows <= kept


def test_trainer_key_typo_and_bad_value_types_are_refused_before_any_run_dir(tmp_path, capsys):
    logs = tmp_path / "logs"
    args = ["--base", AE_CFG, "-t", "-l", str(logs)] + TINY_AE
    assert main_mod.main(args + ["lightning.trainer.max_step=3"]) == 2
    refused(capsys, "lightning.trainer.max_step", "did you mean `max_steps`")
    assert main_mod.main(args + ["model.base_learning_rate=abc"]) == 2
    refused(capsys, "model.base_learning_rate", "'abc'", "number")
    assert main_mod.main(args + ["data.params.batch_size=2.5"]) == 2
    refused(capsys, "data.params.batch_size")
    assert not logs.exists()


# ---------------------------------------------------------------- checkpoints are checked

def test_nan_weights_are_refused_naming_the_tensor(tiny_run, tmp_path, capsys):
    ck = torch.load(tiny_run / "checkpoints/last.ckpt", weights_only=True)
    key = "model.diffusion_model.out.2.weight"
    ck["state_dict"][key][0] = float("nan")
    bad = tmp_path / "checkpoints" / "nan.ckpt"
    bad.parent.mkdir()
    torch.save(ck, bad)
    out = tmp_path / "out"
    cfg = sorted((tiny_run / "configs").glob("*-project.yaml"))[-1]
    assert txt2img.main(["--ckpt", str(bad), "--config", str(cfg), "--n_samples", "1", "--steps", "2",
                         "--outdir", str(out)]) == 2
    refused(capsys, str(bad), key, "NaN")
    assert not out.exists()
    assert convert.main(["--ckpt", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2  # nor exported
    refused(capsys, key, "NaN")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_file_that_is_no_checkpoint_and_a_model_of_the_wrong_task(tiny_run, tmp_path, capsys):
    junk = tmp_path / "notes.ckpt"
    junk.write_text("hello\n")
    cfg = sorted((tiny_run / "configs").glob("*-project.yaml"))[-1]
    assert txt2img.main(["--ckpt", str(junk), "--config", str(cfg), "--outdir", str(tmp_path / "o")]) == 2
    refused(capsys, str(junk), "not a readable checkpoint")
    d = inpaint_inputs(tmp_path / "in")
    assert superres.main(["--indir", str(d), "--outdir", str(tmp_path / "o"), "--ckpt",
                          str(tiny_run / "checkpoints/last.ckpt"), "--steps", "2"]) == 2
    refused(capsys, "is not a super-resolution model")
    assert not (tmp_path / "o").exists()


def test_an_autoencoder_checkpoint_is_named_as_such(tiny_run, tmp_path, capsys):
    ae = tiny_run.parent / "ae.safetensors"
    assert txt2img.main(["--ckpt", str(ae), "--config", AE_CFG, "--outdir", str(tmp_path / "o")]) == 2
    refused(capsys, str(ae), "is an autoencoder (AutoencoderKL)", "diffusion model is needed")
    cfg = sorted((tiny_run / "configs").glob("*-project.yaml"))[-1]
    assert txt2img.main(["--ckpt", str(ae), "--config", str(cfg), "--outdir", str(tmp_path / "o")]) == 2
    refused(capsys, "holds an autoencoder's weights; the config builds a diffusion model")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- arguments are checked before any work

def test_evaluate_checks_counts_and_files_before_loading_anything(tiny_run, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(evaluate, "load_for_sampling", no_work)
    base = ["-r", str(tiny_run), "--outdir", str(tmp_path / "ev"), "--metrics", "adherence", "--n", "4"]
    assert evaluate.main(base + ["--steps", "4", "0"]) == 2
    refused(capsys, "--steps must be at least 1, got 0")
    assert evaluate.main(base + ["--from_file", str(tmp_path / "prompts.txt")]) == 2
    refused(capsys, "--from_file", "prompts.txt", "no such file")
    assert evaluate.main(base + ["--batch_size", "0"]) == 2
    refused(capsys, "--batch_size")
    assert not (tmp_path / "ev").exists()


def test_truncated_init_image_is_named(tiny_run, tmp_path, capsys):
    path = png(tmp_path / "init.png", (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert img2img.main(["--init-img", str(path), "--prompt", "x", "--ckpt", str(tiny_run / "checkpoints/last.ckpt"),
                         "--outdir", str(tmp_path / "o")]) == 2
    refused(capsys, str(path), "truncated")
    assert not (tmp_path / "o").exists()


def test_txt2img_missing_prompt_file_is_named(tiny_run, tmp_path, capsys):
    assert txt2img.main(["--from-file", str(tmp_path / "none.txt"), "--ckpt", str(tiny_run / "checkpoints/last.ckpt"),
                         "--outdir", str(tmp_path / "o")]) == 2
    refused(capsys, "--from-file", "none.txt")
    assert txt2img.main(["--sampler", "heun", "--ddim_eta", "0.5", "--ckpt", str(tmp_path / "missing.ckpt"),
                         "--outdir", str(tmp_path / "o")]) == 2
    refused(capsys, "sampler 'heun' has no eta")
    (tmp_path / "afile").write_text("")
    assert txt2img.main(["--outdir", str(tmp_path / "afile"), "--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    refused(capsys, "--outdir", "afile exists and is not a folder")  # before the checkpoint is even looked for


# ---------------------------------------------------------------- summaries and image reading

def test_inpaint_summary_counts_what_was_written_and_skipped(tiny_run, tmp_path, capsys):
    d = inpaint_inputs(tmp_path / "in", name="a")
    inpaint_inputs(d, mask_size=16, name="b")
    assert inpaint.main(inpaint_args(d, tmp_path / "out", tiny_run)) == 1
    cap = capsys.readouterr()
    assert "wrote 1 image(s)" in cap.out and "skipped 1" in cap.out
    assert "skipped b.png: mask b_mask.png is 16x16, the image 32x32" in cap.err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


def test_inpaint_reads_a_16_bit_gray_image_at_its_value(tiny_run, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    gray16 = np.full((32, 32), 32896, np.uint16)  # 32896 / 65535 = 128 / 255: mid-gray
    Image.fromarray(gray16).save(d / "g.png")
    assert Image.open(d / "g.png").mode.startswith("I")
    mask = np.zeros((32, 32), np.uint8)
    mask[:8, :8] = 255
    png(d / "g_mask.png", mask)
    assert inpaint.main(inpaint_args(d, tmp_path / "out", tiny_run)) == 0
    out = np.asarray(Image.open(tmp_path / "out/g.png"))
    assert np.all(out[8:, 8:] == 128)  # the kept pixels are the input's value, not clipped to white


def test_one_image_reader_for_every_mode(tmp_path):
    from ldm.files import ImageReadError, read_image, read_rgb8
    rgb = np.zeros((6, 4, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    cases = {
        "rgb.png": Image.fromarray(rgb),
        "gray.png": Image.fromarray(np.full((6, 4), 128, np.uint8)),
        "bit.png": Image.fromarray(np.ones((6, 4), bool)),
        "pal.png": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.zeros((6, 4), np.uint8)])),
        "la.png": Image.fromarray(np.full((6, 4, 2), 128, np.uint8), mode="LA"),
        "g16.png": Image.fromarray(np.full((6, 4), 65535, np.uint16)),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
    corner = rgb.copy()
    corner[:2, :2] = (255, 0, 0)
    exif = Image.fromarray(corner)
    info = exif.getexif()
    info[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    exif.save(tmp_path / "exif.jpg", exif=info, quality=100, subsampling=0)
    got = {n: read_image(tmp_path / n) for n in [*cases, "exif.jpg"]}
    for n, a in got.items():
        assert a.dtype == np.float32 and a.shape[-1] == 3 and 0 <= a.min() and a.max() <= 1, n
    assert got["rgb.png"][0, 0].tolist() == [1, 0, 0] and got["pal.png"][0, 0].tolist() == [1, 0, 0]
    assert np.allclose(got["gray.png"], 128 / 255) and np.allclose(got["la.png"], 128 / 255)
    assert np.all(got["bit.png"] == 1) and np.all(got["g16.png"] == 1)
    assert got["rgba.png"][0, 0].tolist() == [1, 0, 0]  # alpha dropped, the stored colour kept
    assert got["exif.jpg"].shape == (4, 6, 3) and got["exif.jpg"][0, -1, 0] > 0.8  # upright: red top-left -> top-right
    assert np.asarray(read_rgb8(tmp_path / "g16.png")).tolist() == np.full((6, 4, 3), 255).tolist()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(tmp_path / "bad.png")
