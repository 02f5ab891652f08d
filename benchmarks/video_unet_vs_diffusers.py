"""Benchmark: the video UNet's training step, ours (VideoUNet, sgm's layout) vs diffusers'
UNetSpatioTemporalConditionModel of the same shape, in one run.

    python benchmarks/video_unet_vs_diffusers.py [--model-channels 64] [--batch 1] [--frames 8] [--side 16] \
        [--head 64] [--steps 6] [--threads N]

Stable Video Diffusion's architecture at a reduced width: channel_mult 1,2,4,4, two res-blocks per level,
spatial + temporal transformers at the first three levels (64-wide heads by default, linear projections, the extra
feed-forward in, spatial context for the temporal cross-attention, alpha learned with images), (3, 1, 1)
temporal convolutions, a 768-d vector input (three 256-d size embeddings in diffusers) and a 1024-d context
of one token. The weights are not converted between the layouts (no SVD key map here yet): both start from
their own initialisation, which does not change the arithmetic; the parameter counts are printed to show the
shapes agree. Each step: forward on (batch, 4 + 4, frames, side, side) latents, MSE to a target, backward,
AdamW; the two alternate step by step and the median step times and their ratio are printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.modules.diffusionmodules.video_model import VideoUNet  # noqa: E402

CONTEXT, VECTOR, SIZE_EMBED = 1024, 768, 256


def ours(mc: int, frames: int, head: int) -> VideoUNet:
    return VideoUNet(in_channels=8, out_channels=4, model_channels=mc, num_res_blocks=2, attention_resolutions=[4, 2, 1],
                     channel_mult=[1, 2, 4, 4], num_head_channels=head, transformer_depth=1, context_dim=CONTEXT,
                     use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=VECTOR,
                     extra_ff_mix_layer=True, use_spatial_context=True, merge_strategy="learned_with_images",
                     merge_factor=0.0, video_kernel_size=[3, 1, 1])


def theirs(mc: int, frames: int, head: int):
    from diffusers import UNetSpatioTemporalConditionModel
    chans = (mc, 2 * mc, 4 * mc, 4 * mc)
    return UNetSpatioTemporalConditionModel(in_channels=8, out_channels=4, block_out_channels=chans,
                                            addition_time_embed_dim=SIZE_EMBED,
                                            projection_class_embeddings_input_dim=VECTOR, layers_per_block=2,
                                            cross_attention_dim=CONTEXT,
                                            num_attention_heads=tuple(c // head for c in chans), num_frames=frames)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--side", type=int, default=16)
    p.add_argument("--head", type=int, default=64, help="attention head width (SVD: 64)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mc, b, t, s = args.model_channels, args.batch, args.frames, args.side
    a, d = ours(mc, t, args.head), theirs(mc, t, args.head)
    print(f"parameters: ours {count(a):,}, diffusers {count(d):,}")
    x = torch.randn(b, 8, t, s, s)
    target = torch.randn(b, 4, t, s, s)
    ts = torch.randint(0, 1000, (b,)).float()
    ctx = torch.randn(b, 1, CONTEXT)
    vec = torch.randn(b, VECTOR)
    ids = torch.randn(b, 3)

    def step_ours(opt):
        out = a(x, ts, context=ctx, y=vec)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_theirs(opt):
        out = d(x.movedim(1, 2), ts, encoder_hidden_states=ctx, added_time_ids=ids).sample
        loss = torch.nn.functional.mse_loss(out, target.movedim(1, 2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    opts = (torch.optim.AdamW(a.parameters()), torch.optim.AdamW(d.parameters()))
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(args.warmup + args.steps):
        for k, (fn, opt) in enumerate(((step_ours, opts[0]), (step_theirs, opts[1]))):
            t0 = time.perf_counter()
            fn(opt)
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    mo, md = statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3
    print(f"batch {b} x {t} frames of {s}x{s}x8, width {mc}, {args.steps} steps each, {torch.get_num_threads()} threads")
    print(f"ours (VideoUNet): {mo:.1f} ms/step; diffusers (UNetSpatioTemporalConditionModel): {md:.1f} ms/step; "
          f"ratio diffusers / ours = {md / mo:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
