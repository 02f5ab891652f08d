"""Evaluation metrics against hand-computed values, feature extractors from stand-in weights in the caches, the
offline errors, the reference cache and the domain classifier."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.eval.images import resize_bicubic, to_uint8_rgb
from ldm.eval.statistics import (GaussianStats, frechet_distance, inception_score, kernel_inception_distance,
                                 precision_recall)
from ldm.pretrained import PretrainedWeightsMissing
from test_pretrained import caches, net_attempts, put_in_hub_cache  # noqa: F401 (fixtures)

# -- Frechet distance ------------------------------------------------------------------------------------


def test_frechet_of_known_diagonal_gaussians():
    a = GaussianStats(np.array([0.0, 1.0, 2.0]), np.diag([1.0, 4.0, 9.0]), 0)
    b = GaussianStats(np.array([1.0, 1.0, 0.0]), np.diag([4.0, 1.0, 1.0]), 0)
    # commuting covariances: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(s1) - sqrt(s2))^2
    want = (1 + 0 + 4) + ((1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2)
    assert frechet_distance(a, b) == pytest.approx(want, abs=1e-10)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)


def test_frechet_of_non_commuting_covariances_matches_scipy_sqrtm():
    import scipy.linalg
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    want = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * root))
    assert frechet_distance(GaussianStats(mu1, s1, 0), GaussianStats(mu2, s2, 0)) == pytest.approx(want, rel=1e-9)


def test_frechet_statistics_are_float64():
    # features with a large common offset: a float32 mean loses the small differences between the sets
    rng = np.random.default_rng(0)
    base = rng.normal(size=(400, 8)).astype(np.float32)
    a = base + np.float32(3e4)
    b = base + np.float32(3e4) + np.float32(0.01)
    sa, sb = GaussianStats.of(torch.from_numpy(a)), GaussianStats.of(torch.from_numpy(b))
    assert sa.mu.dtype == np.float64 and sa.sigma.dtype == np.float64
    # same covariance, means 0.01 apart in each of 8 dimensions: FID = 8 * 0.01^2 (up to float32 inputs)
    assert frechet_distance(sa, sb) == pytest.approx(8 * 0.01 ** 2, rel=0.05)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(sa, GaussianStats.of(rng.normal(size=(10, 4))))

# -- KID, IS, precision / recall --------------------------------------------------------------------------


def _mmd2_unbiased_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731  cubic polynomial kernel, gamma = 1 / d, coef 1
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda K: (K.sum() - np.trace(K)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_matches_hand_computed_unbiased_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(30, 5))
    # one subset holding every sample: the estimate is the full unbiased MMD^2 (invariant to the order drawn)
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=30)
    assert mean == pytest.approx(_mmd2_unbiased_by_hand(x, y), rel=1e-9)
    assert std == 0.0


def test_kid_of_identical_sets_is_the_unbiased_estimate_near_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 5))
    mean, _ = kernel_inception_distance(x, x, subsets=1, subset_size=40)
    assert mean == pytest.approx(_mmd2_unbiased_by_hand(x, x), rel=1e-9)
    far, _ = kernel_inception_distance(x, x + 3.0, subsets=1, subset_size=40)
    assert abs(mean) < 0.05 * far


def test_inception_score_of_uniform_and_of_confident_balanced_predictions():
    assert inception_score(np.zeros((20, 7)), splits=1)[0] == pytest.approx(1.0)
    logits = 50.0 * np.eye(5)[np.arange(20) % 5]  # confident, each class equally often: IS = number of classes
    assert inception_score(logits, splits=1)[0] == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(np.zeros((5, 3)), splits=10)


def test_precision_recall_of_a_hand_made_case():
    real = np.arange(5, dtype=float)[:, None]  # k = 1: each real ball has radius 1
    fake = np.array([[0.5], [10.0]])  # fake balls: radius 9.5 (each other's distance)
    p, r = precision_recall(fake, real, k=1)
    assert p == pytest.approx(0.5)  # 0.5 lies in a real ball, 10 does not
    assert r == pytest.approx(1.0)  # every real point lies within 9.5 of 0.5
    assert precision_recall(real, real, k=1) == (1.0, 1.0)

# -- PSNR / SSIM / LPIPS ------------------------------------------------------------------------------------


def test_psnr_of_a_known_perturbation_and_ssim_of_identical_images():
    from ldm.metrics import reconstruction_metrics
    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    m = reconstruction_metrics(x, x + 0.2)  # 0.1 on the [0, 1] scale everywhere: MSE 0.01, PSNR 20 dB
    assert float(m["psnr"]) == pytest.approx(20.0, abs=1e-3)
    assert float(reconstruction_metrics(x, x)["ssim"]) == pytest.approx(1.0, abs=1e-6)
    assert float(m["ssim"]) < 1.0

# -- images as the evaluators read them -----------------------------------------------------------------------


def test_uint8_quantization_is_the_png_writer_s(tmp_path):
    from ldm.files import save_png, to_uint8
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    for i, a in enumerate(to_uint8(x)):
        save_png(a, tmp_path / f"{i}.png", {})
    back = np.stack([np.asarray(Image.open(tmp_path / f"{i}.png")) for i in range(3)]).transpose(0, 3, 1, 2)
    assert torch.equal(to_uint8_rgb(x), torch.from_numpy(back))
    gray = to_uint8_rgb(x[:, :1])
    assert gray.shape == (3, 3, 8, 8) and torch.equal(gray[:, 0], gray[:, 2])
    with pytest.raises(TypeError, match="float in \\[-1, 1\\] or uint8"):
        to_uint8_rgb(torch.zeros(1, 3, 4, 4, dtype=torch.int32))


def test_bicubic_resize_is_pil_s_antialiased_filter():
    img = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard
    x = torch.from_numpy(np.stack([img] * 3))[None]
    small = resize_bicubic(x, 8)
    assert abs(float(small.float().mean()) - 127.5) < 2 and float(small.float().std()) < 3  # averaged, not aliased
    want = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((8, 8), Image.Resampling.BICUBIC))
    assert torch.equal(small[0, 0], torch.from_numpy(np.clip(np.round(want), 0, 255).astype(np.uint8)))
    assert resize_bicubic(x, 32) is x

# -- the Inception extractor from stand-in weights -----------------------------------------------------------


def inception_standin(path: Path, seed: int = 0) -> Path:
    """Random weights in the layout of the TF-FID Inception file (no real weights can be had offline)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    torch.manual_seed(seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = fe.FeatureExtractorInceptionV3("standin", ["2048"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def test_inception_found_in_torch_hub_cache_and_fid_of_a_set_with_itself(caches, net_attempts):
    from ldm.eval.features import INCEPTION_URL, InceptionFeatures
    inception_standin(caches / "torch" / "hub" / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1])
    ex = InceptionFeatures()  # no path given: the torch hub cache
    assert ex.settings["resize"] == "pil_bicubic" and len(ex.settings["weights_sha256"]) == 10
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = ex(x)
    assert out["features"].shape == (4, 2048) and out["logits"].shape == (4, 1008)
    assert out["features"].dtype == torch.float64
    legacy = InceptionFeatures(resize="tf_bilinear")(x)["features"]
    assert not torch.allclose(legacy, out["features"])  # the resize method is a setting, and it matters
    s = GaussianStats.of(out["features"])
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-6)
    assert net_attempts == []


def test_inception_offline_error_names_the_file_and_where(caches, monkeypatch, net_attempts):
    from ldm.eval.features import InceptionFeatures
    monkeypatch.setenv("LDM_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsMissing) as e:
        InceptionFeatures()
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert str(caches / "torch" / "hub" / "checkpoints") in msg and "--inception_weights" in msg
    assert net_attempts == []


def test_inception_refuses_a_weights_file_holding_code(tmp_path):
    from ldm.checkpoint import CheckpointError
    from ldm.eval.features import InceptionFeatures
    bad = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(1), "x": Path("anything")}, bad)  # a pickled object beyond tensors
    with pytest.raises(CheckpointError, match="refusing to load"):
        InceptionFeatures(bad)

# -- CLIP score ---------------------------------------------------------------------------------------------


def tiny_clip_model(folder: Path) -> Path:
    """A tiny CLIP (text + vision) with a byte-level vocabulary and its processor, saved as transformers does."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    folder.mkdir(parents=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def test_clip_score_from_hub_cache_matches_hand_computed_cosine(caches, net_attempts):
    from transformers import CLIPModel, CLIPProcessor
    from ldm.eval.clip_score import DEFAULT_CLIP, CLIPScorer
    src = tiny_clip_model(caches / "src")
    put_in_hub_cache(caches / "hf" / "hub", DEFAULT_CLIP, {p.name: p for p in src.iterdir()})
    scorer = CLIPScorer()  # found in the hub cache under its hub id
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["a red circle", "a blue square", "a green triangle"]
    got = scorer(x, prompts)
    model, proc = CLIPModel.from_pretrained(src), CLIPProcessor.from_pretrained(src)
    u8 = to_uint8_rgb(x)
    with torch.no_grad():
        img = model.get_image_features(proc(images=list(u8), return_tensors="pt")["pixel_values"]).pooler_output
        t = proc(text=prompts, return_tensors="pt", padding=True)
        txt = model.get_text_features(t["input_ids"], t["attention_mask"]).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert got == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-4)
    assert scorer(u8, prompts) == pytest.approx(got)  # float [-1, 1] and uint8 inputs agree
    assert net_attempts == []


def test_clip_score_offline_error_names_the_model_and_where(caches):
    from ldm.eval.clip_score import CLIPScorer
    with pytest.raises(PretrainedWeightsMissing) as e:
        CLIPScorer()
    msg = str(e.value)
    assert "openai/clip-vit-large-patch14" in msg and "--clip_model" in msg
    assert "models--openai--clip-vit-large-patch14" in msg

# -- reference cache and domain classifier ----------------------------------------------------------------------


class _Counting:
    builds = 0


def test_reference_features_cached_with_settings(tmp_path, monkeypatch):
    from ldm.eval import reference as ref_mod
    from ldm.eval.reference import reference_features

    class Extractor:
        name, settings = "toy", {"extractor": "mean-color"}

        def __call__(self, images):
            return {"features": images.float().mean(dim=(2, 3)).double()}

    real_instantiate = ref_mod.instantiate_from_config

    def counting(cfg):
        _Counting.builds += 1
        return real_instantiate(cfg)

    monkeypatch.setattr(ref_mod, "instantiate_from_config", counting)
    cfg = {"target": "ldm.data.shapes.ShapesValidation", "params": {"size": 16, "num_samples": 12}}
    a = reference_features(cfg, Extractor(), cache_dir=tmp_path)
    assert _Counting.builds == 1 and len(a) == 12
    from ldm.data.shapes import ShapesValidation
    ds = ShapesValidation(size=16, num_samples=12)
    by_hand = np.stack([np.round((ds[i]["image"] + 1) * 127.5).mean(axis=(0, 1)) for i in range(12)])
    assert np.allclose(a.features.numpy(), by_hand, atol=1e-4)  # the loader's images, quantized as samples are
    b = reference_features(cfg, Extractor(), cache_dir=tmp_path)
    assert _Counting.builds == 1 and torch.equal(a.features, b.features)  # from the cache
    assert np.array_equal(a.stats.sigma, b.stats.sigma)
    reference_features(cfg, Extractor(), cache_dir=tmp_path, n=6)  # other settings: computed anew
    assert _Counting.builds == 2
    assert len(list(tmp_path.glob("toy-*.npz"))) == 2


def test_reference_subsets_are_random_not_a_prefix():
    from ldm.eval.reference import subset_indices
    idx = subset_indices(100, 10)
    assert idx == sorted(set(idx)) and len(idx) == 10 and idx != list(range(10))
    assert idx == subset_indices(100, 10) and subset_indices(5, 10) == list(range(5))
    assert subset_indices(100, None) == list(range(100))


def test_domain_classifier_trains_saves_and_loads(tmp_path):
    from ldm.data.bundled import SklearnDigits
    from ldm.eval.domain import load_domain_classifier, save_domain_classifier, train_domain_classifier
    from ldm.eval.features import DomainFeatures
    tr, va = SklearnDigits("train", 16), SklearnDigits("validation", 16)
    trained = train_domain_classifier(tr, va, ["class_label"], steps=150, batch_size=32, width=8, feature_dim=16)
    assert trained.info["validation_accuracy"]["class_label"] > 0.5  # 10 classes: chance is 0.1
    path = save_domain_classifier(trained, tmp_path / "digits.safetensors")
    ex = DomainFeatures(path)
    x = torch.from_numpy(np.stack([va[i]["image"] for i in range(8)]).transpose(0, 3, 1, 2))
    out = ex(x)
    assert out["features"].shape == (8, 16)
    assert torch.allclose(out["features"].float(), trained.classifier.embed(x)["features"])
    assert ex.settings["validation_accuracy"] == trained.info["validation_accuracy"]
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a domain classifier"):
        load_domain_classifier(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="train_domain_classifier.py"):
        load_domain_classifier(tmp_path / "missing.safetensors")


def test_evaluator_names_what_is_missing():
    from ldm.eval.evaluator import Evaluator
    with pytest.raises(ValueError, match="unknown metric"):
        Evaluator(["fdi"])
    with pytest.raises(ValueError, match="reference dataset"):
        Evaluator(["domain_fid"], domain_classifier="x.safetensors")
    with pytest.raises(ValueError, match="domain classifier file"):
        Evaluator(["domain_fid"], reference={"target": "x"})


def test_fid_and_kid_match_torch_fidelity_end_to_end(tmp_path):
    """Legacy mode (TF-bilinear resize) reproduces torch-fidelity's own FID / KID on the same weights and images."""
    import torch_fidelity
    from ldm.eval.features import InceptionFeatures
    weights = inception_standin(tmp_path / "inception.pth", seed=3)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (12, 3, 24, 24), dtype=torch.uint8, generator=g)
    b = (a.float() * 0.7 + 40).to(torch.uint8)

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    ref = torch_fidelity.calculate_metrics(input1=Images(a), input2=Images(b), fid=True, kid=True, kid_subset_size=12,
                                           feature_extractor_weights_path=str(weights), cache=False, verbose=False,
                                           batch_size=6, cuda=False)
    ex = InceptionFeatures(weights, resize="tf_bilinear")
    fa, fb = ex(a)["features"], ex(b)["features"]
    ours = frechet_distance(GaussianStats.of(fa), GaussianStats.of(fb))
    assert ours == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    kid, _ = kernel_inception_distance(fa, fb, subset_size=12)
    assert kid == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-3)


def test_lpips_matches_the_formula_by_hand(tmp_path):
    """LPIPS (Zhang et al. 2018): sum over layers of the spatial mean of w . (unit-normalized feature difference)^2."""
    import torchvision
    from ldm.metrics import reconstruction_metrics
    from ldm.modules.losses.lpips import build_lpips
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16().state_dict(), tmp_path / "vgg.pth")
    lp = build_lpips("vgg", "pretrained", tmp_path / "vgg.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        fx, fy = lp.net(lp.scaling_layer(x)), lp.net(lp.scaling_layer(y))
        total = torch.zeros(2)
        for a, b, lin in zip(fx, fy, lp.lins):
            unit = lambda f: f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
            w = lin.model[-1].weight.view(1, -1, 1, 1)
            total += (w * (unit(a) - unit(b)) ** 2).sum(1).mean(dim=(1, 2))
    got = reconstruction_metrics(x, y, lpips_net=lp)["lpips"]
    assert float(got) == pytest.approx(float(total.mean()), rel=1e-5)
    assert float(reconstruction_metrics(x, x, lpips_net=lp)["lpips"]) == pytest.approx(0.0, abs=1e-7)
