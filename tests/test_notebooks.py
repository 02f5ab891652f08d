"""The notebooks: stored without outputs, rebuilt from their sources, and txt2img.ipynb executed headless on a tiny
run (the path `make notebooks` takes)."""
from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_notebooks_carry_no_outputs_and_match_their_sources(path):
    nbformat = pytest.importorskip("nbformat")
    import make_notebooks
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    rebuilt = make_notebooks.cells_of(path.with_suffix(".py").read_text())
    assert [c.source for c in rebuilt] == [c.source for c in nb.cells]  # no hand edits drifting from the source


def test_txt2img_notebook_runs_headless_on_a_tiny_run(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    import nbformat
    import run_notebooks
    monkeypatch.setenv("LDM_TXT2IMG_CKPT", str(tiny_run / "checkpoints" / "last.ckpt"))
    seconds = run_notebooks.run(ROOT / "notebooks" / "txt2img.ipynb", tmp_path, timeout=600)
    nb = nbformat.read(tmp_path / "txt2img.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 4 and all(len(base64.b64decode(o.data["image/png"])) > 1000 for o in images)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(tiny_run) in text and "ms/eval" in text and seconds > 0


def test_a_failing_cell_names_the_notebook(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    import run_notebooks
    bad = tmp_path / "bad.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('boom')")]), bad)
    with pytest.raises(RuntimeError, match="bad.ipynb: a cell failed"):
        run_notebooks.run(bad, tmp_path / "out", timeout=60)
    assert (tmp_path / "out" / "bad.ipynb").is_file()
    slow = tmp_path / "slow.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import time; time.sleep(30)")]), slow)
    with pytest.raises(RuntimeError, match="slow.ipynb: a cell timed out"):
        run_notebooks.run(slow, tmp_path / "out", timeout=2)
