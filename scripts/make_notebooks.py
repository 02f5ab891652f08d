"""Build the .ipynb notebooks (no outputs) from their percent-format sources notebooks/*.py.

    python scripts/make_notebooks.py            # writes notebooks/<name>.ipynb next to each source
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def cells_of(source: str) -> list:
    """Split `# %%` / `# %% [markdown]` blocks into code and markdown cells."""
    cells = []
    for block in re.split(r"^# %%", source, flags=re.M)[1:]:
        header, _, body = block.partition("\n")
        body = body.strip("\n")
        if "[markdown]" in header:
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif body:
            cells.append(nbformat.v4.new_code_cell(body))
    return cells


def main() -> int:
    for src in sorted((ROOT / "notebooks").glob("*.py")):
        nb = nbformat.v4.new_notebook(cells=cells_of(src.read_text()))
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, src.with_suffix(".ipynb"))
        print(f"wrote {src.with_suffix('.ipynb')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
