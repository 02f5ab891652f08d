"""Users' CompVis / Stable Diffusion configs and datasets: every published target imports with its parameters, the
taming names work without taming, and the dataset classes read small local copies made here."""
from __future__ import annotations

import csv
import inspect
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.local import DatasetNotFound
from ldm.util import get_obj_from_str, instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "tests" / "data" / "published_targets.json"


def reference_targets() -> list[tuple[str, list[str]]]:
    """(target, parameter names) of every target in users' published CompVis / SD configs (tests/data)."""
    return [(t, row["params"]) for t, row in json.loads(TARGETS.read_text()).items()]


def accepted_parameters(obj) -> set[str]:
    """Parameter names a class accepts: its __init__'s, and its bases' while each passes **kwargs on."""
    names: set[str] = set()
    for klass in (obj.__mro__ if inspect.isclass(obj) else [obj]):
        fn = klass.__init__ if inspect.isclass(obj) else klass
        if inspect.isclass(obj) and "__init__" not in vars(klass):
            continue
        params = inspect.signature(fn).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def test_the_reference_list_is_read():
    assert len(reference_targets()) == 48


@pytest.mark.parametrize("target,params", reference_targets(), ids=[t for t, _ in reference_targets()])
def test_every_published_target_imports_and_binds_its_parameters(target, params):
    obj = get_obj_from_str(target)
    missing = sorted(set(params) - accepted_parameters(obj))
    assert not missing, f"{target} does not take {missing}"
    if target.startswith("taming.") and __import__("importlib").util.find_spec("taming") is None:
        assert obj.__module__.startswith("ldm."), obj.__module__  # mapped onto this project's class


def test_a_real_taming_package_is_used_when_installed(tmp_path, monkeypatch):
    pkg = tmp_path / "taming" / "modules" / "losses"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "taming", tmp_path / "taming" / "modules", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "vqperceptual.py").write_text("class VQLPIPSWithDiscriminator:\n    REAL_TAMING = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "taming" or m.startswith("taming.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        obj = get_obj_from_str("taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator")
        assert getattr(obj, "REAL_TAMING", False)
    finally:  # the fake package must not outlive this test
        for name in [m for m in sys.modules if m == "taming" or m.startswith("taming.")]:
            sys.modules.pop(name)


def test_meaningless_parameters_are_reported_once(caplog):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    kw = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[], num_res_blocks=1,
              channel_mult=[1], num_heads=2, use_fp16=True)
    with caplog.at_level(logging.INFO):
        UNetModel(**kw)
        UNetModel(**kw)
    assert sum("use_fp16" in r.getMessage() for r in caplog.records) <= 1
    import ldm.config_keys
    assert any("use_fp16" in m for m in ldm.config_keys._reported)


def test_image_logger_takes_the_published_parameters():
    logger = get_obj_from_str("main.ImageLogger")(batch_frequency=5, max_images=2, disabled=True, enable_autocast=False,
                                                  increase_log_steps=False, log_first_step=True,
                                                  log_images_kwargs={"N": 2})
    assert logger.disabled and not logger.enable_autocast and logger.log_images_kwargs == {"N": 2}


def test_spatial_rescaler():
    from ldm.modules.encoders.modules import SpatialRescaler
    r = SpatialRescaler(n_stages=2, in_channels=182, out_channels=3)
    assert r(torch.rand(2, 182, 64, 64)).shape == (2, 3, 16, 16)
    assert SpatialRescaler(n_stages=1, multiplier=0.5, method="nearest")(torch.rand(1, 3, 8, 8)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="method"):
        SpatialRescaler(method="spline")


# --- datasets on small fake trees ---------------------------------------------------------------------------

def _img(path: Path, size=(40, 30), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


SYNSETS = [("n01440764", "tench, Tinca tinca"), ("n01443537", "goldfish, Carassius auratus"),
           ("n01484850", "great white shark")]


@pytest.fixture
def imagenet(tmp_path):
    root = tmp_path / "imagenet"
    for split, counts in (("train", (0, 2, 1)), ("val", (0, 1, 1))):  # the first synset has no images here
        for (syn, _), n in zip(SYNSETS, counts):
            for k in range(n):
                _img(root / split / syn / f"{syn}_{k}.JPEG", seed=k)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{s} {h}\n" for s, h in SYNSETS))
    return root


def test_imagenet_labels_names_and_splits(imagenet, monkeypatch):
    from ldm.data.imagenet import ImageNetTrain, ImageNetValidation
    train = ImageNetTrain(config={"size": 32, "data_root": str(imagenet)})
    assert len(train) == 3 and train.class_labels == [0, 0, 1]  # labels over the synsets present, sorted
    item = train[0]
    assert item["image"].shape == (32, 32, 3) and item["human_label"] == "goldfish, Carassius auratus"
    assert item["synset"] == "n01443537" and item["relpath"].startswith("n01443537/")
    orig = ImageNetTrain(config={"size": 32, "data_root": str(imagenet), "keep_orig_class_label": True})
    assert orig.class_labels == [1, 1, 2]  # index among all synsets of the mapping
    sub = ImageNetTrain(config={"size": 32, "data_root": str(imagenet), "sub_indices": "2"})
    assert {s for s in sub.synsets_of} == {"n01484850"}
    monkeypatch.setenv("LDM_IMAGENET_ROOT", str(imagenet))
    assert len(ImageNetValidation(config={"size": 16})) == 2


def test_imagenet_missing_data_names_what_to_set(tmp_path, monkeypatch):
    from ldm.data.imagenet import ImageNetTrain
    monkeypatch.delenv("LDM_IMAGENET_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFound) as e:
        ImageNetTrain(config={"size": 32})
    assert "data/imagenet" in str(e.value) and "LDM_IMAGENET_ROOT" in str(e.value) and "config.data_root" in str(e.value)


def test_imagenet_sr_pairs(imagenet):
    from ldm.data.imagenet import ImageNetSRTrain, ImageNetSRValidation
    ds = ImageNetSRTrain(size=32, degradation="pil_bicubic", downscale_f=4, data_root=str(imagenet))
    item = ds[1]
    assert item["image"].shape == (32, 32, 3) and item["LR_image"].shape == (8, 8, 3)
    assert item["class_label"] == 0 and item["synset"] == "n01443537"
    assert len(ImageNetSRValidation(size=16, degradation="bsrgan_light", data_root=str(imagenet))) == 2


def test_lsun_splits_from_file_lists(tmp_path, monkeypatch):
    from ldm.data.lsun import LSUNChurchesTrain, LSUNChurchesValidation
    lsun = tmp_path / "lsun"
    for k in range(3):
        _img(lsun / "churches" / f"c{k}.webp", size=(50, 40), seed=k)
    (lsun / "church_outdoor_train.txt").write_text("c0.webp\nc1.webp\n")
    (lsun / "church_outdoor_val.txt").write_text("c2.webp\n")
    monkeypatch.setenv("LDM_LSUN_ROOT", str(lsun))
    train, val = LSUNChurchesTrain(size=16), LSUNChurchesValidation(size=16)
    assert len(train) == 2 and len(val) == 1
    assert train[0]["image"].shape == (16, 16, 3) and val[0]["relative_file_path_"] == "c2.webp"
    explicit = LSUNChurchesTrain(size=8, data_root=str(lsun / "churches"), txt_file=str(lsun / "church_outdoor_val.txt"))
    assert len(explicit) == 1
    (lsun / "church_outdoor_val.txt").write_text("c2.webp\nmissing.webp\n")
    with pytest.raises(DatasetNotFound, match="missing.webp"):
        LSUNChurchesValidation(size=16)


def test_faces_with_their_lists_and_the_taming_names(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for k in range(2):
        _img(data / "ffhq" / f"{k:05}.png", size=(32, 32), seed=k)
    (data / "ffhqtrain.txt").write_text("00000.png\n")
    (data / "ffhqvalidation.txt").write_text("00001.png\n")
    (data / "celebahq").mkdir()
    np.save(data / "celebahq" / "a.npy", np.zeros((24, 24, 3), np.uint8))
    (data / "celebahqtrain.txt").write_text("a.npy\n")
    monkeypatch.setenv("LDM_FACES_ROOT", str(data))
    ffhq = instantiate_from_config({"target": "taming.data.faceshq.FFHQTrain", "params": {"size": 16}})
    assert len(ffhq) == 1 and ffhq[0]["image"].shape == (16, 16, 3)
    celeb = instantiate_from_config({"target": "ldm.data.faceshq.CelebAHQTrain", "params": {"size": 16}})
    assert float(celeb[0]["image"].min()) == -1.0  # the .npy image (black) read and scaled
    with pytest.raises(Exception, match="celebahqvalidation.txt"):
        instantiate_from_config({"target": "taming.data.faceshq.CelebAHQValidation", "params": {"size": 16}})


def _openimages(root: Path) -> Path:
    root.mkdir(parents=True)
    with open(root / "class-descriptions-boxable.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["/m/a", "Cat"], ["/m/b", "Dog"], ["/m/c", "Tree"]])
    rows = [["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
             "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"],
            ["img0", "x", "/m/b", "1", "0.1", "0.5", "0.2", "0.6", "0", "0", "0", "0", "0"],
            ["img0", "x", "/m/c", "1", "0.6", "0.9", "0.1", "0.9", "0", "0", "1", "0", "0"],
            ["img1", "x", "/m/a", "1", "0.0", "1.0", "0.0", "1.0", "0", "0", "0", "0", "0"]]
    for split in ("train", "validation"):
        with open(root / f"{split}-annotations-bbox.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        _img(root / split / "img0.jpg", size=(60, 60), seed=1)
        _img(root / split / "img1.jpg", size=(60, 40), seed=2)
        _img(root / split / "img2.jpg", size=(60, 40), seed=3)  # no boxes: left out
    return root


def test_openimages_bbox_layout_tokens(tmp_path):
    from ldm.data.openimages import OpenImagesBBoxTrain, OpenImagesBBoxValidation
    root = _openimages(tmp_path / "oi")
    val = OpenImagesBBoxValidation(size=32, datapath=str(root))
    assert len(val) == 2
    item = val[0]
    assert item["image"].shape == (32, 32, 3) and item["bbox_img"].shape == (32, 32, 3)
    tokens = item["coordinates_bbox"]
    assert tokens.shape == (92,) and tokens.dtype == torch.long and int(tokens.max()) < 8192
    objects = val.encoder.decode(tokens)
    assert [c for c, _ in objects] == [2, 1]  # sorted by top edge: the tree (top 0.1) then the dog
    (x0, y0, x1, y1) = dict(objects)[1]
    assert abs(x0 - 0.1) < 0.02 and abs(y0 - 0.2) < 0.02 and abs(x1 - 0.5) < 0.02 and abs(y1 - 0.6) < 0.02
    assert int(tokens[0]) == 2 + 3 * 1  # the tree IsGroupOf: class + no_object_classes * 1
    assert all(int(t) == 8191 for t in tokens[6:90])  # padding
    train = OpenImagesBBoxTrain(size=32, datapath=str(root), seed=0)
    assert train[1]["coordinates_bbox"].shape == (92,)
    with pytest.raises(DatasetNotFound, match="class-descriptions-boxable.csv"):
        OpenImagesBBoxTrain(size=32, datapath=str(tmp_path))


def test_full_openimages(tmp_path):
    from ldm.data.openimages import FullOpenImagesTrain, FullOpenImagesValidation
    root = _openimages(tmp_path / "oi")
    ds = FullOpenImagesTrain(size=40, crop_size=32, root=str(root), seed=0)
    assert len(ds) == 3 and ds[0]["image"].shape == (32, 32, 3)
    assert FullOpenImagesValidation(size=20, root=str(root))[1]["image"].shape == (20, 30, 3)


# --- WebDataset shards ----------------------------------------------------------------------------------------

def _shards(folder: Path, n_shards: int = 8, per_shard: int = 5) -> list[str]:
    import io

    import webdataset as wds
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{s:06}.tar")) as sink:
            for k in range(per_shard):
                key = f"s{s}_{k}"
                buf = io.BytesIO()
                Image.fromarray(np.full((20, 20, 3), 10 * k, np.uint8)).save(buf, format="JPEG")
                meta = {"original_width": 512, "original_height": 512, "pwatermark": 0.1, "punsafe": 0.0}
                caption = "a photo of a house"
                if k == 1:
                    meta["original_width"] = 100  # dropped by min_size
                if k == 2:
                    meta["pwatermark"] = 0.9  # dropped by max_pwatermark
                if k == 3:
                    caption = "a FORBIDDEN word"  # dropped by filter_word_list
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption, "json": json.dumps(meta)})
                keys.append(key)
    return keys


def test_webdataset_shards_are_read_disjointly_by_2_ranks_x_2_workers(tmp_path, monkeypatch):
    from ldm.data.laion import WebDataModuleFromConfig
    keys = _shards(tmp_path / "shards")
    kept = {k for k in keys if k.split("_")[1] in ("0", "4")}
    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = WebDataModuleFromConfig(
            tar_base=str(tmp_path / "shards"), batch_size=2, num_workers=2, multinode=True, min_size=256,
            max_pwatermark=0.5, filter_word_list=["forbidden"], p_unsafe_threshold=0.5,
            train={"shards": "{000000..000007}.tar", "repeat": False, "image_key": "jpg",
                   "image_transforms": [{"target": "torchvision.transforms.Resize", "params": {"size": 16}}]})
        seen[rank] = []
        for batch in dm.train_dataloader():
            assert batch["jpg"].shape[1:] == (16, 16, 3) and float(batch["jpg"].min()) >= -1.0
            assert len(batch["txt"]) == batch["jpg"].shape[0]
            seen[rank] += batch["__key__"]
    assert not set(seen[0]) & set(seen[1])  # no sample read by both ranks
    assert sorted(seen[0] + seen[1]) == sorted(kept)  # every kept sample once; the filtered ones dropped
    assert len(seen[0]) == len(seen[1]) == len(kept) // 2


def test_webdataset_missing_shards_name_tar_base(tmp_path):
    from ldm.data.laion import WebDataModuleFromConfig
    dm = WebDataModuleFromConfig(tar_base=str(tmp_path), batch_size=2, train={"shards": "{000000..000003}.tar"})
    with pytest.raises(DatasetNotFound, match="tar_base"):
        dm.train_dataloader()


# --- an original-style config trains through main.py on fake data --------------------------------------------

@pytest.mark.slow  # 33 s on 2 cores: make test stays under about 10 minutes
def test_lsun_churches_config_trains_through_main_on_a_fake_tree(tmp_path):
    """configs/ldm/lsun_churches-ldm-kl-8.yaml, its model at full size: data roots, the first stage and (for CPU
    time) 128-pixel images set by dot-list overrides."""
    import main as main_mod
    lsun = tmp_path / "lsun"
    for k in range(3):
        _img(lsun / "churches" / f"c{k}.jpg", size=(300, 260), seed=k)
    (lsun / "train.txt").write_text("c0.jpg\nc1.jpg\n")
    (lsun / "val.txt").write_text("c2.jpg\n")
    rc = main_mod.main([
        "--base", str(ROOT / "configs/ldm/lsun_churches-ldm-kl-8.yaml"), "-t", "-n", "churches", "-l", str(tmp_path),
        "model.params.first_stage_config.params.ckpt_path=null", "data.params.batch_size=1",
        "data.params.num_workers=0", f"data.params.train.params.data_root={lsun / 'churches'}",
        f"data.params.train.params.txt_file={lsun / 'train.txt'}",
        f"data.params.validation.params.data_root={lsun / 'churches'}",
        f"data.params.validation.params.txt_file={lsun / 'val.txt'}",
        "data.params.train.params.size=128", "data.params.validation.params.size=128",
        "lightning.trainer.max_steps=2", "lightning.trainer.limit_val_batches=1",
        "lightning.trainer.num_sanity_val_steps=0", "lightning.trainer.enable_progress_bar=false",
        "lightning.trainer.benchmark=false", "lightning.trainer.log_every_n_steps=1",
        # a full-size checkpoint with optimizer state is ~5 GB: not written here
        "lightning.callbacks.checkpoint_callback.params.save_top_k=0",
        "lightning.callbacks.checkpoint_callback.params.save_last=false"])
    assert rc == 0
    run = next(tmp_path.glob("*_churches"))
    with open(run / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["train/loss_simple"]) for r in rows if r.get("train/loss_simple")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(r.get("val/loss_simple_ema") for r in rows)


# --- configs written with the originals' targets and parameters build at full size ----------------------------

FULL_SIZE = ["configs/ldm/cin-ldm-vq-f8.yaml", "configs/ldm/celebahq-ldm-vq-4.yaml", "configs/ldm/ffhq-ldm-vq-4.yaml",
             "configs/ldm/lsun_bedrooms-ldm-vq-4.yaml", "configs/ldm/lsun_churches-ldm-kl-8.yaml",
             "configs/ldm/layout2img-openimages256.yaml", "configs/ldm/semantic_synthesis256.yaml",
             "configs/ldm/inpainting_big.yaml", "configs/ldm/bsr_sr.yaml", "configs/ldm/txt2img-1p4B.yaml",
             "configs/autoencoder/autoencoder_kl_f8.yaml", "configs/autoencoder/autoencoder_vq_f4.yaml",
             "configs/stable-diffusion/v1-inference.yaml", "configs/stable-diffusion/v2-inference.yaml",
             "configs/stable-diffusion/v2-inference-v.yaml", "configs/stable-diffusion/v2-inpainting-inference.yaml",
             "configs/stable-diffusion/x4-upscaling.yaml"]


def _drop_ckpt_paths(node) -> None:
    from omegaconf import DictConfig, ListConfig
    if isinstance(node, DictConfig):
        for k in list(node.keys()):
            if k == "ckpt_path":
                node[k] = None
            else:
                _drop_ckpt_paths(node._get_node(k))
    elif isinstance(node, ListConfig):
        for item in node:
            _drop_ckpt_paths(item)


@pytest.mark.parametrize("path", FULL_SIZE, ids=lambda p: Path(p).stem)
def test_model_sections_build_at_full_size(path, tmp_path, monkeypatch):
    """Checkpoint paths removed; frozen pretrained text encoders may stop with the missing-weights message."""
    import gc

    from ldm.pretrained import PretrainedWeightsMissing
    from ldm.util import ConfigError, load_config
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, offline (tests run offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = load_config(ROOT / path)
    _drop_ckpt_paths(cfg.model)
    if "lossconfig" in cfg.model.params and "LPIPS" in str(cfg.model.params.lossconfig.get("target")):
        import torchvision  # LPIPS' VGG16 backbone in the torch hub cache (features only: all LPIPS reads)
        ckpt = tmp_path / "torch" / "hub" / "checkpoints"
        ckpt.mkdir(parents=True)
        feats = {f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()}
        torch.save(feats, ckpt / "vgg16-397923af.pth")
    cond = cfg.model.params.get("cond_stage_config")
    frozen = isinstance(cond, (dict, type(cfg))) and "Frozen" in str(cond.get("target", ""))
    try:
        model = instantiate_from_config(cfg.model)
    except ConfigError as e:
        assert frozen and isinstance(e.__cause__, PretrainedWeightsMissing), e
        assert "Looked in" in str(e) and "cond_stage_config.params.version" in str(e)
        return
    n = sum(p.numel() for p in model.parameters())
    assert n > 5e6, n  # the published widths, not a shrunken copy
    del model
    gc.collect()
