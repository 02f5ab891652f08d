"""A resumable evaluation over a grid of samplers x steps x guidance scales.

Each cell samples N images (per-image seeds), optionally saves them as PNG, scores them with an Evaluator and
appends one JSON line to `results.jsonl`. A rerun skips the cells already there with the same settings, and
inside an interrupted cell reads back the PNGs already written (they are bit-identical to regenerated
samples). `results.csv` / `results.json` are rewritten after every cell.
"""
from __future__ import annotations

import csv
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.eval.cost import forwards_per_sample
from ldm.generation import guidance_as_input
from ldm.eval.generate import Conditions, generate
from ldm.eval.reference import settings_key
from ldm.files import read_rgb8


@dataclass(frozen=True)
class Cell:
    """One grid point."""
    sampler: str
    steps: int
    scale: float

    @property
    def name(self) -> str:
        return f"{self.sampler}-{self.steps}steps-scale{self.scale:g}"


def grid(samplers: Sequence[str], steps: Sequence[int], scales: Sequence[float]) -> list[Cell]:
    return [Cell(s, int(n), float(g)) for s, n, g in itertools.product(samplers, steps, scales)]


def read_results(path: Path) -> list[dict]:
    """Rows of a results.jsonl (a truncated last line, from an interrupted write, is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_tables(rows: list[dict], outdir: Path, settings: dict) -> None:
    """results.json (settings + rows) and results.csv (one row per cell, every scalar column)."""
    (outdir / "results.json").write_text(json.dumps({"settings": settings, "results": rows}, indent=2, default=str))
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, (dict, list))]
    with open(outdir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _read_pngs(folder: Path, start: int, stop: int) -> Optional[torch.Tensor]:
    files = [folder / f"{k:06d}.png" for k in range(start, stop)]
    if not all(f.is_file() for f in files):
        return None
    return torch.from_numpy(np.stack([np.asarray(read_rgb8(f)).transpose(2, 0, 1) for f in files]))


def run_grid(model, cells: Iterable[Cell], evaluator: Callable[..., dict], conditions: Conditions, *, n: int,
             seed: int, batch_size: int, outdir: Path, settings: dict, save_samples: bool = True,
             flops_per_forward: Optional[int] = None, reference_flops: Optional[int] = None,
             extra: Optional[dict[str, Any]] = None, sampler_options: Optional[dict] = None,
             use_ema: bool = True) -> list[dict]:
    """Evaluate every cell (skipping finished ones); returns all rows of this run's settings."""
    outdir.mkdir(parents=True, exist_ok=True)
    key = settings_key(settings)
    jsonl = outdir / "results.jsonl"
    done = {r["cell"]: r for r in read_results(jsonl) if r.get("settings_key") == key}
    cells = list(cells)
    bar = tqdm(cells, desc="grid", unit="cell")
    for cell in bar:
        bar.set_postfix_str(cell.name)
        if cell.name in done:
            continue
        folder = outdir / "samples" / f"{cell.name}-{key[:8]}"
        if save_samples:
            folder.mkdir(parents=True, exist_ok=True)
        images: list[torch.Tensor] = []
        t_sample = 0.0
        k = 0
        with tqdm(total=n, desc=cell.name, unit="img", leave=False) as ibar:
            while k < n:  # reuse a whole batch of PNGs already written by an interrupted run
                stop = min(k + batch_size, n)
                old = _read_pngs(folder, k, stop) if save_samples else None
                if old is None:
                    break
                images.append(old)
                ibar.update(stop - k)
                k = stop
            t0 = time.perf_counter()
            for first, batch in generate(model, n, conditions, sampler=cell.sampler, steps=cell.steps,
                                         scale=cell.scale, seed=seed, batch_size=batch_size, start=k,
                                         sampler_options=sampler_options, use_ema=use_ema):
                if save_samples:
                    for j, img in enumerate(batch.permute(0, 2, 3, 1).numpy()):
                        Image.fromarray(img).save(folder / f"{first + j:06d}.png")
                images.append(batch)
                ibar.update(len(batch))
            t_sample = time.perf_counter() - t0
        x = torch.cat(images)
        t0 = time.perf_counter()
        cond = conditions.batch(0, n)
        metrics = evaluator(x, prompts=cond if conditions.kind == "text" else None,
                            labels=cond if conditions.kind == "class" else None)
        row = {"cell": cell.name, **asdict(cell), "n": n, "seed": seed,
               "forwards_per_sample": forwards_per_sample(cell.sampler, cell.steps, cell.scale,
                                                          guidance_doubles=not guidance_as_input(model)), **(extra or {}),
               **metrics, "sampling_seconds": round(t_sample, 2), "sampled_images": n - k,
               "metric_seconds": round(time.perf_counter() - t0, 2), "settings_key": key}
        if flops_per_forward is not None:
            row["gflops_per_sample"] = row["forwards_per_sample"] * flops_per_forward / 1e9
            if reference_flops:
                row["normalized_cost"] = row["forwards_per_sample"] * flops_per_forward / reference_flops
        with open(jsonl, "a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        done[cell.name] = row
        write_tables([done[c.name] for c in cells if c.name in done], outdir, settings)
    rows = [done[c.name] for c in cells]
    write_tables(rows, outdir, settings)
    return rows
