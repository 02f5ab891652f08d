"""Execute the notebooks headless (nbclient) and write the executed copies, with outputs, to outputs/notebooks/.

    python scripts/run_notebooks.py                    # all of notebooks/*.ipynb (make notebooks)
    python scripts/run_notebooks.py txt2img --timeout 600

A failing cell stops with the notebook, the cell number and the error; the time of each notebook is printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, outdir: Path, timeout: int) -> float:
    """Execute one notebook in the repository root; write the executed copy; return its wall-clock seconds."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        outdir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, outdir / path.name)
        what = "timed out" if isinstance(e, CellTimeoutError) else "failed"
        raise RuntimeError(f"{path.name}: a cell {what} (executed copy: {outdir / path.name}; --timeout sets the "
                           f"seconds per cell)\n{str(e)[-2000:]}") from None
    seconds = time.perf_counter() - t0
    outdir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, outdir / path.name)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("names", nargs="*", help="notebook names (default: all of notebooks/*.ipynb)")
    p.add_argument("--outdir", default=str(ROOT / "outputs" / "notebooks"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell (the brief trainings take minutes)")
    opt = p.parse_args(argv)
    paths = ([ROOT / "notebooks" / (n if n.endswith(".ipynb") else f"{n}.ipynb") for n in opt.names]
             or sorted((ROOT / "notebooks").glob("*.ipynb")))
    missing = [str(q) for q in paths if not q.is_file()]
    if missing:
        print(f"error: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    total = 0.0
    for path in paths:
        try:
            seconds = run(path, Path(opt.outdir), opt.timeout)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        total += seconds
        print(f"{path.name}: {seconds:.0f} s -> {Path(opt.outdir) / path.name}", flush=True)
    print(f"all notebooks: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
