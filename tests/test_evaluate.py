"""scripts/evaluate.py and the sampling it does: per-image seeds, class balance, resuming, settings in the outputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def shapes_classifier(tmp_path_factory) -> Path:
    from ldm.data.shapes import ShapesTrain, ShapesValidation
    from ldm.eval.domain import save_domain_classifier, train_domain_classifier
    trained = train_domain_classifier(ShapesTrain(size=32, num_samples=64), ShapesValidation(size=32, num_samples=8),
                                      ["shape", "color"], steps=10, batch_size=16, width=8, feature_dim=8)
    return save_domain_classifier(trained, tmp_path_factory.mktemp("clf") / "shapes.safetensors")


@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    from ldm.inference import load_for_sampling
    model, _ = load_for_sampling(tiny_run / "checkpoints" / "last.ckpt", device="cpu")
    with torch.no_grad():  # away from initialisation: a fresh UNet's output layer is zero
        g = torch.Generator().manual_seed(1)
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_per_image_seeds_give_the_same_images_at_batch_sizes_1_and_4(tiny_model):
    from ldm.eval.generate import conditions_for, generate
    from ldm.data.shapes import ShapesValidation
    cond = conditions_for(tiny_model, 5, reference=ShapesValidation(size=32, num_samples=5))
    kw = dict(sampler="dpmpp_2m_sde", steps=3, scale=2.0, seed=7)  # a stochastic sampler: noise at every step
    one = torch.cat([b for _, b in generate(tiny_model, 5, cond, batch_size=1, **kw)])
    four = torch.cat([b for _, b in generate(tiny_model, 5, cond, batch_size=4, **kw)])
    assert one.dtype == torch.uint8 and one.shape == (5, 3, 32, 32)
    assert torch.equal(one, four)
    later = torch.cat([b for _, b in generate(tiny_model, 5, cond, batch_size=2, start=3, **kw)])
    assert torch.equal(later, one[3:])  # a resumed run continues with the same images
    other = torch.cat([b for _, b in generate(tiny_model, 5, cond, batch_size=4, **{**kw, "seed": 8})])
    assert not torch.equal(other, one)


def test_class_conditional_conditions_are_balanced():
    from ldm.eval.generate import conditions_for

    class Model:
        cond_stage_key = "class_label"

        class cond_stage_model:
            n_classes = 10

    c = conditions_for(Model(), 25)
    assert c.kind == "class" and np.bincount(c.values).tolist() == [3] * 5 + [2] * 5


def _evaluate(run, outdir, clf, *extra):
    import evaluate
    return evaluate.main(["-r", str(run), "--outdir", str(outdir), "--n", "4", "--samplers", "ddim", "--steps", "2",
                          "--scales", "1", "3", "--metrics", "domain_fid", "domain_prc", "adherence",
                          "--domain_classifier", str(clf), "--cache_dir", str(Path(outdir) / "cache"),
                          "--device", "cpu", *extra])


def _pngs(folder: Path) -> dict:
    return {p.parent.name.rsplit("-", 1)[0] + "/" + p.name: np.asarray(Image.open(p))
            for p in sorted(folder.glob("samples/*/*.png"))}


def test_evaluate_writes_settings_resumes_and_is_batch_size_invariant(tiny_run, shapes_classifier, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _evaluate(tiny_run, a, shapes_classifier, "--batch_size", "4") == 0
    assert _evaluate(tiny_run, b, shapes_classifier, "--batch_size", "1") == 0
    pa, pb = _pngs(a), _pngs(b)
    assert len(pa) == 8 and pa.keys() == pb.keys()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    res = json.loads((a / "results.json").read_text())
    rows = res["results"]
    assert [r["cell"] for r in rows] == ["ddim-2steps-scale1", "ddim-2steps-scale3"]
    assert [r["forwards_per_sample"] for r in rows] == [2, 4]
    for key in ("domain_fid", "domain_precision", "domain_recall", "adherence", "adherence_color", "gflops_per_sample"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert "fid" not in rows[0]  # the domain metric is never reported as FID
    s = res["settings"]
    assert s["n"] == 4 and s["seed"] == 0 and s["evaluation"]["domain"]["weights"] == "shapes.safetensors"
    assert s["evaluation"]["reference"]["target"] == "ldm.data.shapes.ShapesValidation"
    assert s["unet_gflops_per_forward"] > 0
    rows_b = json.loads((b / "results.json").read_text())["results"]
    assert [r["domain_fid"] for r in rows] == pytest.approx([r["domain_fid"] for r in rows_b])
    header = (a / "results.csv").read_text().splitlines()[0].split(",")
    assert {"sampler", "steps", "scale", "domain_fid", "adherence", "sampling_seconds"} <= set(header)

    # a rerun finds every cell done; an interrupted cell (no result, one PNG missing) samples only what is missing
    lines = (a / "results.jsonl").read_text().splitlines()
    assert _evaluate(tiny_run, a, shapes_classifier, "--batch_size", "4") == 0
    assert (a / "results.jsonl").read_text().splitlines() == lines
    (a / "results.jsonl").write_text(lines[0] + "\n")
    last = sorted(a.glob("samples/ddim-2steps-scale3-*/*.png"))[-1]
    last.unlink()
    assert _evaluate(tiny_run, a, shapes_classifier, "--batch_size", "2") == 0
    again = json.loads((a / "results.jsonl").read_text().splitlines()[-1])
    assert again["sampled_images"] == 2  # the batch holding the missing image; the first batch was read back
    assert again["domain_fid"] == pytest.approx(rows[1]["domain_fid"])
    assert np.array_equal(np.asarray(Image.open(last)), pb["ddim-2steps-scale3/" + last.name])


def test_evaluate_errors_name_the_culprit(tiny_run, tmp_path, capsys):
    import evaluate
    rc = evaluate.main(["-r", str(tiny_run), "--outdir", str(tmp_path), "--metrics", "domain_fid"])
    assert rc == 2 and "domain classifier file" in capsys.readouterr().err
    rc = evaluate.main(["-r", str(tiny_run), "--outdir", str(tmp_path), "--metrics", "adherence",
                        "--reference", "data.params.nope"])
    assert rc == 2 and "data.params.nope" in capsys.readouterr().err
    rc = evaluate.main(["-r", str(tmp_path / "missing"), "--outdir", str(tmp_path)])
    assert rc == 2 and "missing" in capsys.readouterr().err
