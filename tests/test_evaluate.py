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
    from ldm.runs import load_for_sampling
    model, _ = load_for_sampling(tiny_run / "checkpoints" / "last.ckpt", device="cpu")
    with torch.no_grad():  # away from initialisation: a fresh UNet's output layer is zero
        g = torch.Generator().manual_seed(1)
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def same_images(a, b) -> bool:
    """Equal up to float rounding: BLAS / convolution kernels are chosen by batch size, so a value sitting on a
    quantization boundary may round to the neighbouring uint8 level; at most 1 level on at most 0.1% of values."""
    d = (torch.as_tensor(a).int() - torch.as_tensor(b).int()).abs()
    return a.shape == b.shape and int(d.max()) <= 1 and float((d > 0).float().mean()) <= 1e-3


def test_per_image_seeds_give_the_same_images_at_batch_sizes_1_and_4(tiny_model):
    from ldm.eval.generate import conditions_for, generate
    from ldm.data.shapes import ShapesValidation
    cond = conditions_for(tiny_model, 5, reference=ShapesValidation(size=32, num_samples=5))
    kw = dict(sampler="dpmpp_2m_sde", steps=3, scale=2.0, seed=7)  # a stochastic sampler: noise at every step
    one = torch.cat([b for _, b in generate(tiny_model, 5, cond, batch_size=1, **kw)])
    four = torch.cat([b for _, b in generate(tiny_model, 5, cond, batch_size=4, **kw)])
    assert one.dtype == torch.uint8 and one.shape == (5, 3, 32, 32)
    assert same_images(one, four)
    later = torch.cat([b for _, b in generate(tiny_model, 5, cond, batch_size=2, start=3, **kw)])
    assert same_images(later, one[3:])  # a resumed run continues with the same images
    other = torch.cat([b for _, b in generate(tiny_model, 5, cond, batch_size=4, **{**kw, "seed": 8})])
    assert not same_images(other, one)


def test_class_conditional_conditions_are_balanced():
    from ldm.eval.generate import conditions_for
    from ldm.modules.model_inputs import ConditionInput

    class Model:  # a model kind answers what it reads
        cond_stage_key = "class_label"
        condition_inputs = frozenset({ConditionInput.LABELS})

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
    assert all(same_images(pa[k], pb[k]) for k in pa)
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
    assert [r["domain_fid"] for r in rows] == pytest.approx([r["domain_fid"] for r in rows_b], rel=1e-3)
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
    assert again["domain_fid"] == pytest.approx(rows[1]["domain_fid"], rel=1e-3)
    assert same_images(np.asarray(Image.open(last)), pb["ddim-2steps-scale3/" + last.name])


def test_evaluate_errors_name_the_culprit(tiny_run, tmp_path, capsys):
    import evaluate
    rc = evaluate.main(["-r", str(tiny_run), "--outdir", str(tmp_path), "--metrics", "domain_fid"])
    assert rc == 2 and "domain classifier file" in capsys.readouterr().err
    rc = evaluate.main(["-r", str(tiny_run), "--outdir", str(tmp_path), "--metrics", "adherence",
                        "--reference", "data.params.nope"])
    assert rc == 2 and "data.params.nope" in capsys.readouterr().err
    rc = evaluate.main(["-r", str(tmp_path / "missing"), "--outdir", str(tmp_path)])
    assert rc == 2 and "missing" in capsys.readouterr().err


def test_train_domain_classifier_script(tmp_path, capsys):
    import train_domain_classifier
    out = tmp_path / "digits.safetensors"
    rc = train_domain_classifier.main(["--base", str(ROOT / "configs/ldm/mnist_class_cond.yaml"), "--labels",
                                       "class_label", "--steps", "3", "--out", str(out),
                                       "--validation_set", "params.num_val=20"])
    assert rc == 0 and out.is_file()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["validation_accuracy"]) == {"class_label"}
    rc = train_domain_classifier.main(["--base", str(ROOT / "configs/ldm/mnist_class_cond.yaml"), "--labels",
                                       "digit", "--steps", "1", "--out", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "no label key 'digit'" in capsys.readouterr().err


@pytest.mark.slow  # 38 s on 2 cores: make test stays under about 10 minutes
def test_scaling_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    """Two widths at equal training compute through main.py, the sweep, the tables and the plot; a rerun resumes."""
    import scaling_study
    from safetensors.torch import save_file
    from ldm.util import instantiate_from_config, load_config
    ae_cfg = load_config(ROOT / "configs/autoencoder/mnist_kl_f4.yaml").model
    save_file(instantiate_from_config(ae_cfg).state_dict(), str(tmp_path / "ae.safetensors"))
    args = ["--ae", str(tmp_path / "ae.safetensors"), "--widths", "32", "64", "--budget_width", "64",
            "--budget_steps", "1", "--n", "10", "--batch_size", "10", "--samplers", "ddim", "--steps", "2",
            "--scales", "1", "2", "--classifier_steps", "2", "--outdir", str(tmp_path / "study"),
            "--logdir", str(tmp_path / "logs")]
    assert scaling_study.main(args) == 0
    study = tmp_path / "study"
    state = json.loads((study / "state.json").read_text())
    assert {k: v["steps"] for k, v in state["trained"].items()} == {"32": 4, "64": 1}  # 3.9x cheaper forwards
    import csv
    rows = list(csv.DictReader(open(study / "study.csv")))
    best = list(csv.DictReader(open(study / "best.csv")))
    assert len(rows) == 4 and len(best) == 2 and (study / "scaling_study.png").stat().st_size > 0
    assert {float(r["normalized_cost"]) for r in rows if r["width"] == "32"} == {2.0, 4.0}
    for b in best:  # the best scale per (width, sampler, steps) has the lowest domain FID of its group
        group = [float(r["domain_fid"]) for r in rows if (r["width"], r["steps"]) == (b["width"], b["steps"])]
        assert float(b["domain_fid"]) == min(group)
    capsys.readouterr()
    assert scaling_study.main(args) == 0
    assert "$ " not in capsys.readouterr().out  # nothing retrained


@pytest.mark.slow
def test_scaling_study_distills_every_width(tmp_path, capsys):
    """--distill: a consistency student per width through main.py, swept at one forward per step whatever the
    scale, the Fig. 2.13 table and plot; a rerun resumes without training again."""
    import csv
    import scaling_study
    from safetensors.torch import save_file
    from ldm.util import instantiate_from_config, load_config
    ae_cfg = load_config(ROOT / "configs/autoencoder/mnist_kl_f4.yaml").model
    save_file(instantiate_from_config(ae_cfg).state_dict(), str(tmp_path / "ae.safetensors"))
    study = tmp_path / "study"
    args = ["--ae", str(tmp_path / "ae.safetensors"), "--widths", "32", "64", "--equal", "steps",
            "--budget_steps", "1", "--n", "10", "--batch_size", "10", "--samplers", "ddim", "--steps", "2", "4",
            "--scales", "1", "2", "--classifier_steps", "2", "--distill", "--distill_steps", "2",
            "--distilled_steps", "1", "2", "--outdir", str(study), "--logdir", str(tmp_path / "logs")]
    assert scaling_study.main(args) == 0
    state = json.loads((study / "state.json").read_text())
    assert {k: (v["steps"], v["teacher"]) for k, v in state["distilled"].items()} == \
        {k: (2, v["ckpt"]) for k, v in state["trained"].items()}
    rows = list(csv.DictReader(open(study / "study.csv")))
    students = [r for r in rows if r["distilled"] == "True"]
    assert len(students) == 8 and {r["sampler"] for r in students} == {"consistency"}
    assert all(int(r["forwards_per_sample"]) == int(r["steps"]) for r in students)  # no CFG doubling at scale 2
    plain = [r for r in rows if r["distilled"] == "False"]
    assert {int(r["forwards_per_sample"]) for r in plain if r["scale"] == "2.0"} == {4, 8}
    table = list(csv.DictReader(open(study / "distillation.csv")))
    assert [t["width"] for t in table] == ["32", "64"] and (study / "distillation.png").stat().st_size > 0
    for t in table:
        mine = [r for r in plain if r["width"] == t["width"]]
        cost = float(t["normalized_cost"])
        assert float(t["student_domain_fid"]) == min(float(r["domain_fid"]) for r in students
                                                     if r["width"] == t["width"] and r["steps"] == "2")
        affordable = [float(r["domain_fid"]) for r in mine if float(r["normalized_cost"]) <= cost]
        assert float(t["undistilled_same_cost_domain_fid"]) == min(affordable)  # DDIM 2 at scale 1 costs 2
        better = [float(r["normalized_cost"]) for r in mine
                  if float(r["domain_fid"]) <= float(t["student_domain_fid"])]
        assert (float(t["undistilled_matching_cost"]) == min(better)) if better else not t["undistilled_matching_cost"]
    capsys.readouterr()
    assert scaling_study.main(args) == 0
    assert "$ " not in capsys.readouterr().out  # nothing trained again
