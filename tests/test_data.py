"""Datasets: the shapes spec and its evaluator, bundled real images, user folders with bad files."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from ldm.data import shapes as S
from ldm.data.bundled import MNIST5k, SkimagePhotoCrops, SklearnDigits
from ldm.data.folder import ImageCaptionFolder, ImageFolder
from ldm.eval.shapes_eval import read_image, score


def test_shapes_deterministic_and_split():
    a, b = S.ShapesDataset(split="train", num_samples=50), S.ShapesDataset(split="train", num_samples=50)
    v = S.ShapesDataset(split="validation", num_samples=50)
    for i in (0, 7, 49):
        assert np.array_equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert any(not np.array_equal(a[i]["image"], v[i]["image"]) for i in range(10))
    c = S.ShapesDataset(split="train", num_samples=50, seed=1)
    assert any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(10))


def test_shapes_item_follows_spec():
    ds = S.ShapesDataset(split="train", num_samples=200)
    for i in range(200):
        it = ds[i]
        img = it["image"]
        assert img.shape == (32, 32, 3) and img.dtype == np.float32 and img.min() >= -1 and img.max() <= 1
        assert it["caption"] == f"a {it['size']} {it['color']} {it['shape']} in the {it['position']}"
        assert it["class_label"] == S.SHAPES.index(it["shape"]) * 6 + S.COLOR_NAMES.index(it["color"])
        u8 = np.rint((img + 1) * 127.5)
        corner = u8[0, 0]
        assert corner[0] == corner[1] == corner[2] and 16 <= corner[0] <= 64
        # the most saturated pixel has the palette colour
        sat = u8.max(-1) - u8.min(-1)
        px = u8.reshape(-1, 3)[sat.argmax()]
        assert np.abs(px - np.array(S.COLORS[it["color"]])).max() <= 1


def test_shapes_geometry():
    spec = S.ShapeSpec("square", "red", "large", "center", 30, 16.0, 16.0)
    cov = S.coverage(spec, 32)
    assert cov.sum() == pytest.approx(14 * 14, abs=0.5)
    tri = S.coverage(S.ShapeSpec("triangle", "red", "large", "center", 30, 16.0, 16.0), 32)
    assert tri.sum() == pytest.approx(14 * 14 / 2, abs=1.0)
    assert tri[:16].sum() < tri[16:].sum() / 2  # apex up
    circ = S.coverage(S.ShapeSpec("circle", "red", "small", "top left", 30, 9.0, 9.0), 32)
    assert circ.sum() == pytest.approx(np.pi * 16, rel=0.03)


def test_caption_parse_and_prompts():
    assert S.parse_caption("a large blue triangle in the top left") == {
        "size": "large", "color": "blue", "shape": "triangle", "position": "top left"}
    assert S.parse_caption("a small red circle in the center")["position"] == "center"
    with pytest.raises(ValueError, match="color"):
        S.parse_caption("a small circle in the center")
    p = S.random_prompts(20, seed=3)
    assert p == S.random_prompts(20, seed=3) and all(S.parse_caption(x) for x in p)


@pytest.mark.parametrize("size", [32, 64])
def test_evaluator_reads_validation_images(size):
    ds = S.ShapesDataset(split="validation", num_samples=400, size=size)
    res = score([ds[i]["image"] for i in range(len(ds))], [ds[i]["caption"] for i in range(len(ds))])
    assert res["all"] >= 0.99, res


def test_evaluator_rejects_wrong_prompts_and_blank_images():
    ds = S.ShapesDataset(split="validation", num_samples=100)
    wrong = []
    for i in range(100):
        it = ds[i]
        other = S.COLOR_NAMES[(S.COLOR_NAMES.index(it["color"]) + 1) % 6]
        wrong.append(S.canonical_caption(it["shape"], other, it["size"], it["position"]))
    res = score([ds[i]["image"] for i in range(100)], wrong)
    assert res["color"] == 0.0 and res["shape"] >= 0.99
    blank = np.full((32, 32, 3), 40, np.uint8)
    assert read_image(blank).as_dict() == {"shape": None, "color": None, "size": None, "position": None}


@pytest.mark.parametrize("sigma", [0.7, 1.1])
def test_evaluator_reads_shapes_through_blur(sigma):
    """A decoder's blur must not turn small triangles and squares into circles."""
    from scipy.ndimage import gaussian_filter
    ds = S.ShapesDataset(split="validation", num_samples=300)
    images = [gaussian_filter(ds[i]["image"].astype(np.float64), sigma=(sigma, sigma, 0)) for i in range(300)]
    res = score(images, [ds[i]["caption"] for i in range(300)])
    assert res["shape"] >= 0.99 and res["all"] >= 0.99, res


def test_evaluator_reads_no_shape_in_clutter_or_other_forms():
    bg, red = -0.6, np.array([0.8, -0.8, -0.8])
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    radius = np.hypot(xs - 16, ys - 16)
    masks = {
        "two objects": ((np.abs(xs - 7) < 3) & (np.abs(ys - 7) < 3)) | ((np.abs(xs - 23) < 4) & (np.abs(ys - 23) < 4)),
        "cross": ((np.abs(xs - 16) < 2) & (np.abs(ys - 16) < 8)) | ((np.abs(ys - 16) < 2) & (np.abs(xs - 16) < 8)),
        "ring": (radius < 8) & (radius > 4),
        "bar": (np.abs(ys - 16) < 2) & (np.abs(xs - 16) < 12),
    }
    for name, m in masks.items():
        img = np.where(m[..., None], red, bg)
        assert read_image(img).shape is None, name
    blob = np.exp(-(radius ** 2) / 18.0)[..., None]  # a round blur spot reads as a circle, not another shape
    assert read_image(bg + blob * (red - bg)).shape == "circle"


def test_a_new_colour_outside_the_grammar_is_drawn_only_when_asked_and_read_only_when_listed():
    """NEW_COLORS (words to teach by fine-tuning): the default grammar is unchanged, a `colors` set draws only them,
    and the evaluator reads the new colour only when told it exists (else its captions are refused by name)."""
    assert not set(S.NEW_COLORS) & set(S.COLORS)
    plain, six = S.ShapesDataset(num_samples=40), S.ShapesDataset(num_samples=40, colors=S.COLOR_NAMES)
    assert [plain[i]["caption"] for i in range(40)] == [six[i]["caption"] for i in range(40)]
    assert S.random_prompts(20) == S.random_prompts(20, colors=S.COLOR_NAMES)
    new = S.ShapesDataset(num_samples=30, seed=1, colors=["orange"])
    items = [new[i] for i in range(30)]
    assert {it["color"] for it in items} == {"orange"} and {it["class_label"] for it in items} == {-1}
    images, captions = [it["image"] for it in items], [it["caption"] for it in items]
    seven = list(S.COLOR_NAMES) + ["orange"]
    assert score(images, captions, colors=seven)["all"] == 1.0
    with pytest.raises(ValueError, match="cannot read the color"):
        score(images, captions)
    # with six colours the orange shapes read as the nearest old colour, never as orange
    assert {read_image(im).color for im in images} <= set(S.COLOR_NAMES)
    # the old colours still read as themselves with the new one listed
    old = S.ShapesDataset(num_samples=60, seed=1)
    assert score([old[i]["image"] for i in range(60)], [old[i]["caption"] for i in range(60)], colors=seven)["all"] == 1
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        S.ShapesDataset(num_samples=4, colors=["teal"])


def test_mixed_datasets_concatenate_with_repeats_and_name_a_bad_part():
    from ldm.data.mix import MixedDatasets
    from ldm.util import ConfigError
    new = {"target": "ldm.data.shapes.ShapesDataset", "params": {"num_samples": 3, "seed": 1, "colors": ["orange"]}}
    old = {"target": "ldm.data.shapes.ShapesDataset", "params": {"num_samples": 4, "seed": 2}}
    mix = MixedDatasets([new, old], repeats=[2, 1])
    assert len(mix) == 10
    assert [mix[i]["color"] for i in range(6)] == ["orange"] * 6
    assert [mix[i]["caption"] for i in range(3)] == [mix[i]["caption"] for i in range(3, 6)]
    assert [mix[i]["caption"] for i in range(6, 10)] == [S.ShapesDataset(num_samples=4, seed=2)[i]["caption"]
                                                         for i in range(4)]
    with pytest.raises(IndexError):
        mix[10]
    with pytest.raises(ConfigError, match="repeats"):
        MixedDatasets([new, old], repeats=[1])
    with pytest.raises(ConfigError, match=r"MixedDatasets.datasets\[1\]"):
        MixedDatasets([new, {"target": "ldm.data.shapes.NoSuchSet"}])


def test_bundled_datasets():
    tr, va = MNIST5k(split="train", size=32), MNIST5k(split="validation", size=32)
    assert len(tr) == 4500 and len(va) == 500
    it = tr[0]
    assert it["image"].shape == (32, 32, 1) and -1 <= it["image"].min() and it["image"].max() <= 1
    assert sorted(set(int(tr[i]["class_label"]) for i in range(0, 4500, 50))) == list(range(10))
    d = SklearnDigits(split="validation", size=16, channels=3)
    assert d[0]["image"].shape == (16, 16, 3) and len(d) == 180
    ph = SkimagePhotoCrops(split="train", size=32, num_samples=20)
    assert ph[3]["image"].shape == (32, 32, 3) and np.array_equal(ph[3]["image"], ph[3]["image"])
    assert ph[3]["image"].std() > 0.01


def _write_png(path, color):
    Image.fromarray(np.full((20, 24, 3), color, np.uint8)).save(path)


def test_image_folder_with_classes_and_corrupt_file(tmp_path, caplog):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs" / "deep").mkdir(parents=True)
    _write_png(tmp_path / "cats" / "a.png", 10)
    (tmp_path / "cats" / "b.png").write_bytes(b"\x89PNG not really")
    _write_png(tmp_path / "dogs" / "deep" / "c.jpg", 200)
    ds = ImageFolder(tmp_path, size=16, class_subfolders=True)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 3
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert "b.png" in caplog.text
    assert all(it["image"].shape == (16, 16, 3) for it in items)
    assert [it["class_label"] for it in items] == [0, 1, 1]  # the corrupt file was replaced by the next one


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="root"):
        ImageFolder("???")


def test_caption_folder_txt_jsonl_csv(tmp_path):
    _write_png(tmp_path / "x.png", 50)
    (tmp_path / "x.txt").write_text("a gray card\n")
    _write_png(tmp_path / "y.png", 90)  # no caption: skipped with a log line
    ds = ImageCaptionFolder(tmp_path, size=8, crop="random", flip=True, seed=0)
    assert len(ds) == 1 and ds[0]["caption"] == "a gray card"
    (tmp_path / "m.jsonl").write_text(json.dumps({"file": "y.png", "caption": "second", "aesthetic": 6}) + "\n")
    listed = ImageCaptionFolder(tmp_path, size=8, manifest="m.jsonl")
    assert listed[0]["caption"] == "second" and listed.metadata == [{"aesthetic": 6}]  # the row's other fields
    assert ds.metadata == [{}]
    (tmp_path / "m.csv").write_text("file,caption\nx.png,first\ny.png,second\n")
    ds = ImageCaptionFolder(tmp_path, size=8, manifest=tmp_path / "m.csv")
    assert [ds[i]["caption"] for i in range(2)] == ["first", "second"]
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        ImageCaptionFolder(tmp_path, manifest="bad.jsonl")


def test_a_data_module_without_a_validation_split_validates_nothing_instead_of_crashing():
    """A train-only data config (DreamBooth, users' own): no validation loader, not a KeyError from inside Lightning."""
    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.util import ConfigError
    dm = DataModuleFromConfig(batch_size=2, num_workers=0, train={"target": "ldm.data.shapes.ShapesValidation",
                                                                  "params": {"size": 16, "num_samples": 4}})
    dm.setup()
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []
    assert len(next(iter(dm.train_dataloader()))["image"]) == 2
    with pytest.raises(ConfigError, match="data.params.train"):
        DataModuleFromConfig(batch_size=2, num_workers=0).train_dataloader()
