"""Helpers for experiments in notebooks: find a trained run, sample grids over samplers, step counts and guidance
scales with timings, record the denoising trajectory (x0 estimates), and show image grids inline (matplotlib)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ldm import generation
from ldm.files import to_uint8
from ldm.generation import sample_prompts, sampling_scope
from ldm.runs import RunDir, latest_run


def find_checkpoint(explicit: Optional[Union[str, Path]], run_name: str, logdir: Union[str, Path] = "logs",
                    how_to_make: str = "") -> Optional[Path]:
    """`explicit` if given (it must exist), else the newest `<logdir>/*_<run_name>/checkpoints/last.ckpt`; None, with
    a printed hint on how to make one, when there is none."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
    try:
        return RunDir(latest_run(logdir, run_name)).last
    except FileNotFoundError:
        print(f"No trained run '*_{run_name}' under {logdir}/. {how_to_make}".strip())
        return None


@dataclass
class SampleRun:
    """Images (B, H, W, C uint8) of one sampling setting and the wall-clock seconds it took."""

    label: str
    images: np.ndarray
    seconds: float
    extra: dict = field(default_factory=dict)


def sample_settings(model, prompts: Sequence[str], settings: Sequence[dict], seed: int = 0) -> list[SampleRun]:
    """One SampleRun per setting (keys: sampler, steps, scale), the same per-image seeds for every setting."""
    runs = []
    seeds = [seed + k for k in range(len(prompts))]
    for s in settings:
        t0 = time.perf_counter()
        images = sample_prompts(model, list(prompts), steps=s["steps"], sampler=s["sampler"], scale=s["scale"],
                                seed=seeds)
        label = f"{s['sampler']} {s['steps']} steps, scale {s['scale']}"
        runs.append(SampleRun(label, to_uint8(images), time.perf_counter() - t0, dict(s)))
    return runs


@torch.no_grad()
def trajectory(model, prompt: str, steps: int = 20, sampler: str = "ddim", scale: float = 3.0, seed: int = 0,
               every: int = 4) -> tuple[list[int], np.ndarray]:
    """The decoded x0 estimate (`denoised`) at every `every`-th model step and the last: (step indices, images).
    (CompVis' uniform DDIM spacing can take one step more than asked; the last step shown is the last taken.)"""
    seen: list[tuple[int, torch.Tensor]] = []

    def record(info: dict) -> None:
        seen.append((int(info["i"]), info["denoised"].detach().clone()))

    g = torch.Generator(device=model.device).manual_seed(seed)
    with sampling_scope(model, context="trajectory"):
        cond = model.conditioning(prompts=[prompt], guidance=generation.needs_unconditional(model, scale))
        generation.generate(model, cond, 1, steps=steps, sampler=sampler, scale=scale, generator=g, callback=record,
                            decode=False)
        kept = [(i, z) for k, (i, z) in enumerate(seen) if k % every == 0 or k == len(seen) - 1]
        decoded = torch.cat([generation.decode_latents(model, z) for _, z in kept])
    return [i for i, _ in kept], to_uint8(decoded)


def show(images: np.ndarray, titles: Optional[Sequence[str]] = None, ncol: Optional[int] = None,
         size: float = 1.6, suptitle: Optional[str] = None) -> None:
    """Images (B, H, W, C uint8) in a grid of matplotlib axes, nearest-neighbour so that small images stay sharp."""
    import matplotlib.pyplot as plt
    n = len(images)
    ncol = ncol or min(n, 8)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(size * ncol, size * nrow + (0.3 if suptitle else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            img = images[k]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[k], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    plt.show()  # inline in a notebook (shown once); nothing under a non-interactive backend


def train_briefly(config: Union[str, Path], name: str, overrides: Sequence[str] = (), logdir: Union[str, Path] = "logs",
                  root: Union[str, Path] = ".") -> Path:
    """Train `config` through main.py (a subprocess, output shown) and return the new run's last.ckpt."""
    import subprocess
    import sys
    cmd = [sys.executable, "main.py", "--base", str(config), "-t", "-n", name, "-l", str(logdir),
           "lightning.trainer.enable_progress_bar=false", *overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=str(root), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training {config} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    return RunDir(latest_run(Path(root) / logdir, name)).last
