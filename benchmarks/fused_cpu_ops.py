"""Benchmark: the fused CPU ops (GEGLU; GroupNorm + SiLU) against torch's ops, per op and in the shapes autoencoder.

    python benchmarks/fused_cpu_ops.py [--rounds 40] [--batch 4] [--ae_batch 16]

Per op: median ms of forward + backward at the shapes of the SD-v1-shape UNet of benchmarks/unet_vs_diffusers.py
(width 64, 32x32 latents, batch 4): its GEGLU inputs at the three attention levels, and its GroupNorm inputs at
each level, channels-last as the UNet runs them; the kernel and torch's ops alternate call by call. Then the shapes
KL-f4 autoencoder's encoder + decoder forward and backward (batch 16 of 32x32 images, contiguous), with the fused
GroupNorm + SiLU on and off in alternate steps. The UNet step itself: benchmarks/unet_vs_diffusers.py --fused-ops both.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.modules import cpu_kernels  # noqa: E402
from ldm.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402
from ldm.modules.diffusionmodules.util import GroupNorm32  # noqa: E402
from ldm.modules.kernel_backend import CpuKernels, use_cpu_kernels  # noqa: E402

# (tokens, half width) of the SD-v1-shape UNet's GEGLU at width 64 (inner 4 x channels), and its GroupNorm inputs
GEGLU_SHAPES = [(1024, 256), (256, 512), (64, 1024)]
NORM_SHAPES = [(64, 32), (128, 32), (192, 32), (128, 16), (256, 16), (384, 16), (256, 8), (512, 8), (256, 4)]


def alternate(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median ms of each function, called in turn for `rounds` rounds after two warm-up rounds."""
    for _ in range(2):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def geglu_row(batch: int, tokens: int, half: int, rounds: int) -> str:
    h = torch.randn(batch, tokens, 2 * half, requires_grad=True)
    grad = torch.randn(batch, tokens, half)

    def torch_ops() -> None:
        a, g = h.chunk(2, dim=-1)
        (a * F.gelu(g)).backward(grad)

    ms = alternate({"torch": torch_ops, "kernel": lambda: cpu_kernels._FusedGeglu.apply(h).backward(grad)}, rounds)
    return f"| GEGLU ({batch}, {tokens}, 2 x {half}) | {ms['torch']:.3f} | {ms['kernel']:.3f} | " \
           f"{ms['torch'] / ms['kernel']:.2f}x |"


def norm_row(batch: int, channels: int, size: int, rounds: int) -> str:
    plain = torch.nn.Sequential(GroupNorm32(32, channels), torch.nn.SiLU())
    fused = copy.deepcopy(plain)
    use_cpu_kernels(fused, CpuKernels())
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)

    def run(layers: torch.nn.Module) -> Callable[[], None]:
        return lambda: layers(x).backward(grad)

    ms = alternate({"torch": run(plain), "kernel": run(fused)}, rounds)
    return f"| GroupNorm + SiLU ({batch}, {channels}, {size}, {size}) channels-last | {ms['torch']:.3f} | " \
           f"{ms['kernel']:.3f} | {ms['torch'] / ms['kernel']:.2f}x |"


def autoencoder_row(batch: int, rounds: int) -> str:
    dd = OmegaConf.load(ROOT / "configs/autoencoder/shapes_kl_f4.yaml").model.params.ddconfig
    torch.manual_seed(0)
    nets = {"kernel": (Encoder(**dd), Decoder(**dd))}
    nets["torch"] = copy.deepcopy(nets["kernel"])
    for net in nets["torch"]:
        use_cpu_kernels(net, CpuKernels(fused_ops=False))
    for net in nets["kernel"]:
        use_cpu_kernels(net, CpuKernels(fused_ops=True))
    x = torch.randn(batch, dd.in_channels, dd.resolution, dd.resolution)

    def run(enc: torch.nn.Module, dec: torch.nn.Module) -> Callable[[], None]:
        return lambda: dec(enc(x)[:, :dd.z_channels]).square().mean().backward()

    ms = alternate({"torch": run(*nets["torch"]), "kernel": run(*nets["kernel"])}, rounds)
    return f"| shapes autoencoder, encoder + decoder, batch {batch} | {ms['torch']:.1f} | {ms['kernel']:.1f} | " \
           f"{ms['torch'] / ms['kernel']:.2f}x |"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ae_batch", type=int, default=16)
    args = p.parse_args()
    cpu_kernels.load_kernel()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; median ms of forward + backward")
    print("| op | torch's ops | fused kernel | speed-up |\n| --- | ---: | ---: | ---: |")
    for tokens, half in GEGLU_SHAPES:
        print(geglu_row(args.batch, tokens, half, args.rounds), flush=True)
    for channels, size in NORM_SHAPES:
        print(norm_row(args.batch, channels, size, args.rounds), flush=True)
    print(autoencoder_row(args.ae_batch, max(args.rounds // 4, 5)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
