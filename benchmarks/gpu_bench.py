"""GPU benchmark: the SD-v1 UNet (860M) and VAE (KL-f8), ours vs diffusers on the same weights, in one run.

    python benchmarks/gpu_bench.py [--batch 8] [--steps 10] [--json out.json]

Weights are perturbed away from initialisation, converted ours -> diffusers, and checked to compute the same
function (fp32, max difference printed). Timed on CUDA events, the two models alternating call by call so
clock and thermal drift hit both alike; medians are reported.
- UNet train step: bf16 autocast, fused AdamW, batch 8 of 64x64x4 latents with a 77x768 context, MSE loss.
- UNet sampling: one classifier-free-guidance pair (batch 2) forward, (a) fp16 weights (`--dtype fp16`),
  (b) fp32 weights under fp16 autocast (`--precision autocast`).
- VAE decode of a 64x64x4 latent to 512x512 with fp16 weights, and a VAE train step (encode, decode, L1; bf16
  autocast, fused AdamW) at batch 4 of 256x256.
FLOPs per call are counted once with torch.utils.flop_counter (matrix products and convolutions); achieved
TFLOP/s = FLOPs / median time. Peak memory is the allocator's peak above what was allocated before the call.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.convert.diffusers_unet import compvis_to_diffusers_unet  # noqa: E402
from ldm.convert.diffusers_vae import compvis_to_diffusers_vae, diffusers_autoencoder_config  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

SD_V1_UNET = dict(image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                  num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=768, legacy=False)
SD_VAE_DD = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                 num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def perturb_(module: torch.nn.Module, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def time_pair(fa: Callable[[], None], fb: Callable[[], None], steps: int, warmup: int) -> tuple[float, float]:
    """Median ms of `fa` and `fb`, called alternately, each timed by CUDA events."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(steps):
        for f, out in ((fa, ta), (fb, tb)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
    return statistics.median(ta), statistics.median(tb)


def peak_mb(f: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    f()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def flops(f: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        f()
    return counter.get_total_flops()


def train_step(model: torch.nn.Module, call: Callable[[], torch.Tensor], target: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16, loss: str = "mse") -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype):
            out = call()
        err = out.float() - target
        (err.pow(2).mean() if loss == "mse" else err.abs().mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def report(name: str, ours_ms: float, theirs_ms: float, n_flops: int, mem: tuple[float, float], out: dict) -> None:
    tflops = n_flops / (ours_ms * 1e-3) / 1e12 if n_flops else float("nan")
    print(f"{name:<34} ours {ours_ms:8.2f} ms   diffusers {theirs_ms:8.2f} ms   ratio {theirs_ms / ours_ms:5.2f}x   "
          f"ours {tflops:6.1f} TFLOP/s   peak MB ours {mem[0]:8.0f} / diffusers {mem[1]:8.0f}")
    out[name] = {"ours_ms": ours_ms, "diffusers_ms": theirs_ms, "ratio": theirs_ms / ours_ms,
                 "ours_tflops": tflops, "flops": n_flops, "peak_mb_ours": mem[0], "peak_mb_diffusers": mem[1]}


def bench_unet(args, dev, results: dict) -> None:
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    ours = UNetModel(**SD_V1_UNET)
    perturb_(ours)
    theirs = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    theirs.load_state_dict(compvis_to_diffusers_unet(ours.state_dict(), 2, 4, [0, 1, 2]), strict=True)
    ours, theirs = ours.to(dev), theirs.to(dev)
    g = torch.Generator(device=dev).manual_seed(1)
    b = args.batch
    x = torch.randn(b, 4, 64, 64, device=dev, generator=g)
    t = torch.randint(0, 1000, (b,), device=dev, generator=g)
    ctx = torch.randn(b, 77, 768, device=dev, generator=g)
    with torch.no_grad():
        diff = (ours(x[:2], t[:2], context=ctx[:2]) - theirs(x[:2], t[:2], encoder_hidden_states=ctx[:2]).sample).abs()
    print(f"UNet: {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters, max |ours - diffusers| (fp32) "
          f"{diff.max().item():.2e}")
    results["unet_parity_fp32_max_abs"] = diff.max().item()
    target = torch.randn_like(x)
    step_o = train_step(ours, lambda: ours(x, t, context=ctx), target)
    step_t = train_step(theirs, lambda: theirs(x, t, encoder_hidden_states=ctx).sample, target)
    step_o()
    step_t()  # optimizer states exist before the memory is read
    mem = (peak_mb(step_o), peak_mb(step_t))
    n = flops(step_o)
    report(f"UNet train step bf16 (batch {b})", *time_pair(step_o, step_t, args.steps, args.warmup), n, mem, results)
    del step_o, step_t
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()

    x2, t2, c2 = x[:2], t[:2], ctx[:2]

    @torch.inference_mode()
    def half_weights(label: str, dtype: torch.dtype) -> None:
        oh, th = copy.deepcopy(ours).to(dtype).eval(), copy.deepcopy(theirs).to(dtype).eval()

        def fo():
            return oh(x2, t2, context=c2)  # float32 inputs: the network casts them to its weights' dtype

        def ft():
            return th(x2.to(dtype), t2, encoder_hidden_states=c2.to(dtype)).sample
        err = ((fo().float() - ft().float()).norm() / ft().float().norm()).item()
        report(f"UNet CFG pair, {label}", *time_pair(fo, ft, args.steps, args.warmup), flops(fo),
               (peak_mb(fo), peak_mb(ft)), results)
        results[f"UNet CFG pair, {label}"]["rel_diff_vs_diffusers"] = err

    for label, dtype in (("fp16 weights", torch.float16), ("bf16 weights", torch.bfloat16)):
        half_weights(label, dtype)
        torch.cuda.empty_cache()
    ours.eval()
    theirs.eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        fo = lambda: ours(x2, t2, context=c2)  # noqa: E731
        ft = lambda: theirs(x2, t2, encoder_hidden_states=c2).sample  # noqa: E731
        report("UNet CFG pair, fp16 autocast", *time_pair(fo, ft, args.steps, args.warmup), flops(fo),
               (peak_mb(fo), peak_mb(ft)), results)
    results["unet_weights_mb"] = {str(d): sum(p.numel() for p in ours.parameters()) * s / 2 ** 20
                                  for d, s in (("fp32", 4), ("fp16", 2))}


def bench_vae(args, dev, results: dict) -> None:
    from diffusers import AutoencoderKL as DiffusersVAE

    from ldm.models.autoencoder import AutoencoderKL
    torch.manual_seed(0)
    ours = AutoencoderKL(ddconfig=SD_VAE_DD, lossconfig=None, embed_dim=4)
    perturb_(ours)
    theirs = DiffusersVAE(**{k: v for k, v in diffusers_autoencoder_config(SD_VAE_DD).items()
                             if k not in ("scaling_factor",)})
    theirs.load_state_dict(compvis_to_diffusers_vae(ours.state_dict()), strict=True)
    ours, theirs = ours.to(dev), theirs.to(dev)
    z = torch.randn(1, 4, 64, 64, device=dev)
    with torch.no_grad():
        diff = (ours.decode(z) - theirs.decode(z).sample).abs().max().item()
    print(f"VAE: max |ours - diffusers| decode (fp32) {diff:.2e}")
    results["vae_parity_fp32_max_abs"] = diff
    x = torch.rand(4, 3, 256, 256, device=dev) * 2 - 1

    def call_o():
        return ours.decode(ours.encode(x).sample())

    def call_t():
        return theirs.decode(theirs.encode(x).latent_dist.sample()).sample
    step_o = train_step(ours, call_o, x, loss="l1")
    step_t = train_step(theirs, call_t, x, loss="l1")
    step_o()
    step_t()
    mem = (peak_mb(step_o), peak_mb(step_t))
    report("VAE train step bf16 (batch 4, 256px)", *time_pair(step_o, step_t, args.steps, args.warmup), flops(step_o),
           mem, results)
    del step_o, step_t
    torch.cuda.empty_cache()
    oh, th = copy.deepcopy(ours).half().eval(), copy.deepcopy(theirs).half().eval()
    with torch.inference_mode():
        fo = lambda: oh.decode(z)  # noqa: E731
        ft = lambda: th.decode(z.half()).sample  # noqa: E731
        report("VAE decode 512px, fp16 weights", *time_pair(fo, ft, args.steps, args.warmup), flops(fo),
               (peak_mb(fo), peak_mb(ft)), results)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    import diffusers
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "diffusers": diffusers.__version__}
    print(f"{results['device']}, torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}")
    bench_unet(args, dev, results)
    torch.cuda.empty_cache()
    bench_vae(args, dev, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
