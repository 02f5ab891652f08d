"""Benchmark: UNet training-step time, ours vs diffusers' UNet2DConditionModel, same weights, same run.

    python benchmarks/unet_vs_diffusers.py [--model-channels 64] [--batch 4] [--steps 10] [--threads N] \
        [--attention auto|fused_cpu|sdpa] [--optimizer same|framework] [--fused-ops on|off|both]

SD-v1 architecture (channel_mult 1,2,4,4; 2 res blocks; attention at 4,2,1; 8 heads; 768-d context)
at a reduced width, batch of 32x32x4 latents with a 77x768 context. Weights are converted from ours to
diffusers so both compute the same function (checked). Each step: forward, MSE to a target, backward,
AdamW step. The two models alternate step by step so machine noise hits both alike; the median
step time of each and their ratio are printed. By default our UNet runs as a user's does, on the
package's default attention backend ('auto': the fused small-head CPU kernel of
`ldm.modules.small_head_attention` for the 8-wide heads here, built on first use); `--attention sdpa`
times it on torch's SDPA, the kernel diffusers uses. `--optimizer same` (default) steps both with
torch.optim.AdamW's defaults (the UNets compared); `framework` steps each as its training code does: ours
with the AdamW that `LatentDiffusion.configure_optimizers` builds (fused where it applies), diffusers'
with torch.optim.AdamW's defaults, as its train_text_to_image.py does. `--fused-ops` (default on, as a user's
run) sets the fused GEGLU and GroupNorm + SiLU kernels of `ldm.modules.cpu_kernels`; `both` times our UNet a
second time in each round with them off, so their effect is measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.convert.diffusers_unet import compvis_to_diffusers_unet  # noqa: E402
from ldm.models.diffusion.diffusion_module import _fused_ok  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from ldm.modules.kernel_backend import CpuKernels, use_cpu_kernels  # noqa: E402
from ldm.modules.small_head_attention import BACKENDS  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--optimizer", choices=["same", "framework"], default="same",
                   help="same: torch.optim.AdamW defaults for both; framework: each framework's training optimizer")
    p.add_argument("--attention", choices=BACKENDS, default=CpuKernels.from_environment().attention,
                   help="our attention backend (default: the package's, 'auto' unless LDM_ATTENTION_BACKEND says "
                        "otherwise; fused_cpu: the small-head kernel; sdpa: torch's SDPA, as diffusers)")
    p.add_argument("--fused-ops", choices=["on", "off", "both"], default="on",
                   help="our fused GEGLU and GroupNorm + SiLU CPU kernels; both: ours timed with and without them")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    mc = args.model_channels
    cfg = dict(image_size=32, in_channels=4, out_channels=4, model_channels=mc, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
               transformer_depth=1, context_dim=768, legacy=False)
    torch.manual_seed(0)
    ours = UNetModel(**cfg)
    with torch.no_grad():  # no zero-initialised layers, so the parity check below is meaningful
        for prm in ours.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    use_cpu_kernels(ours, CpuKernels(attention=args.attention, fused_ops=args.fused_ops != "off"))
    theirs = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=tuple(mc * m for m in (1, 2, 4, 4)),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    theirs.load_state_dict(compvis_to_diffusers_unet(ours.state_dict(), 2, 4, [0, 1, 2]), strict=True)
    x = torch.randn(args.batch, 4, 32, 32)
    t = torch.randint(0, 1000, (args.batch,))
    ctx = torch.randn(args.batch, 77, 768)
    target = torch.randn_like(x)
    with torch.no_grad():
        diff = (ours(x, t, context=ctx) - theirs(x, t, encoder_hidden_states=ctx).sample).abs().max().item()
    print(f"max |ours - diffusers| on the same weights: {diff:.2e}")
    nparams = sum(p.numel() for p in ours.parameters())

    def make_step(model, call, ours_: bool):
        params = list(model.parameters())
        fused = args.optimizer == "framework" and ours_ and _fused_ok(params)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)

        def step() -> float:
            t0 = time.perf_counter()
            loss = torch.nn.functional.mse_loss(call(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t0
        return step

    step_ours = make_step(ours, lambda: ours(x, t, context=ctx), True)
    step_theirs = make_step(theirs, lambda: theirs(x, t, encoder_hidden_states=ctx).sample, False)
    rounds = [step_ours, step_theirs]
    if args.fused_ops == "both":  # a copy of ours on torch's GEGLU and GroupNorm, its own optimizer
        unfused = copy.deepcopy(ours)
        use_cpu_kernels(unfused, CpuKernels(attention=args.attention, fused_ops=False))
        rounds.append(make_step(unfused, lambda: unfused(x, t, context=ctx), True))
    for _ in range(args.warmup):
        for step in rounds:
            step()
    times: list[list[float]] = [[] for _ in rounds]
    for _ in range(args.steps):
        for step, record in zip(rounds, times):
            record.append(step())
    mo, mt = statistics.median(times[0]), statistics.median(times[1])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, params {nparams / 1e6:.2f} M, "
          f"batch {args.batch}, model_channels {mc}, our attention backend {args.attention}, "
          f"optimizer {args.optimizer}, fused ops {args.fused_ops}")
    print(f"ours:      median {mo * 1000:.1f} ms/step  ({1 / mo:.2f} it/s)")
    print(f"diffusers: median {mt * 1000:.1f} ms/step  ({1 / mt:.2f} it/s)")
    print(f"speed ratio (diffusers time / ours): {mt / mo:.2f}x")
    if args.fused_ops == "both":
        mu = statistics.median(times[2])
        print(f"ours without the fused ops: median {mu * 1000:.1f} ms/step; diffusers / it: {mt / mu:.2f}x; "
              f"fused ops speed-up: {mu / mo:.3f}x")
    if args.attention == "auto":
        from ldm.modules import small_head_attention as sha
        chosen = [f"q {k[0]} k {k[2]}{' train' if k[4] else ''}: {'kernel' if v else 'sdpa'}"
                  for k, v in sha._auto_choice.items()]
        print("auto's choices: " + "; ".join(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
