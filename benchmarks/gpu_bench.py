"""GPU benchmark: the SD-v1 UNet (860M) and VAE (KL-f8), ours vs diffusers on the same weights, in one run.

    python benchmarks/gpu_bench.py [--batch 8] [--steps 10] [--json out.json] [--parts train sample layout ...]
    python benchmarks/gpu_bench.py --device cpu --width 32 --size 16 --ctx 64 --steps 2   (a smoke run of the code)

Weights are perturbed away from initialisation, converted ours -> diffusers, and checked to compute the same
function (fp32, max difference printed). Timed on CUDA events, the two models alternating call by call so
clock and thermal drift hit both alike; medians are reported. Parts (`--parts`, in this order; the JSON is
rewritten after each, so a run stopped by a time limit keeps what it finished):
- train: UNet train step, bf16 autocast, fused AdamW, batch 8 of 64x64x4 latents with a 77x768 context, MSE loss.
- sample: classifier-free-guidance pairs (batch 2): one forward with (a) fp16 weights, (b) bf16 weights,
  (c) fp32 weights under fp16 autocast; then 50-step CFG sampling of one 512x512 image with fp16 weights: the
  UNet's time alone (50 pair forwards in a row) and the whole DDIM loop, ours (`ldm.sampling.sample`,
  CFGDenoiser) against diffusers' UNet stepped by its DDIMScheduler.
- layout: our UNet with channels-last weights (the default) against contiguous ones, train step and CFG pair.
- compile_train: the train step with our UNet under torch.compile (default mode) against diffusers eager.
- compile_sample: the 50-step sampling with our UNet under torch.compile, modes `default` and `reduce-overhead`
  (CUDA graphs), against diffusers eager; compile time reported.
- vae: VAE decode of a 64x64x4 latent to 512x512 with fp16 weights, and a VAE train step (encode, decode, L1;
  bf16 autocast, fused AdamW) at batch 4 of 256x256.
FLOPs per call are counted once with torch.utils.flop_counter (matrix products and convolutions, on the eager
model); achieved TFLOP/s = FLOPs / median time. Peak memory is the allocator's peak above what was allocated
before the call.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
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
PARTS = ("train", "sample", "layout", "compile_train", "compile_sample", "vae")
SD_SCHEDULE = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000)  # SD v1's scaled-linear betas
GUIDANCE_SCALE = 7.5


def perturb_(module: torch.nn.Module, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


class Clock:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock (after a synchronize) elsewhere."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def __call__(self, f: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        f()
        return 1000 * (time.perf_counter() - t0)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_pair(clock: Clock, fa: Callable[[], object], fb: Callable[[], object], steps: int,
              warmup: int) -> tuple[float, float]:
    """Median ms of `fa` and `fb`, called alternately."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(steps):
        ta.append(clock(fa))
        tb.append(clock(fb))
    return statistics.median(ta), statistics.median(tb)


def peak_mb(dev: torch.device, f: Callable[[], object]) -> float:
    if dev.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    f()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def flops(f: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        f()
    return counter.get_total_flops()


def first_call_s(dev: torch.device, f: Callable[[], object]) -> float:
    """Seconds of a first call (a compiled module's compilation)."""
    sync(dev)
    t0 = time.perf_counter()
    f()
    sync(dev)
    return time.perf_counter() - t0


def train_step(model: torch.nn.Module, call: Callable[[], torch.Tensor], target: torch.Tensor, dev: torch.device,
               dtype: torch.dtype = torch.bfloat16, loss: str = "mse") -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype):
            out = call()
        err = out.float() - target
        (err.pow(2).mean() if loss == "mse" else err.abs().mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def report(name: str, ours_ms: float, theirs_ms: float, n_flops: int, mem: tuple[float, float], out: dict,
           a: str = "ours", b: str = "diffusers") -> None:
    tflops = n_flops / (ours_ms * 1e-3) / 1e12 if n_flops else float("nan")
    print(f"{name:<44} {a} {ours_ms:8.2f} ms   {b} {theirs_ms:8.2f} ms   ratio {theirs_ms / ours_ms:5.2f}x   "
          f"{a} {tflops:6.1f} TFLOP/s   peak MB {a} {mem[0]:8.0f} / {b} {mem[1]:8.0f}", flush=True)
    out[name] = {f"{a}_ms": ours_ms, f"{b}_ms": theirs_ms, "ratio": theirs_ms / ours_ms, f"{a}_tflops": tflops,
                 "flops": n_flops, f"peak_mb_{a}": mem[0], f"peak_mb_{b}": mem[1]}


class Bench:
    """The SD-v1 UNet pair (ours, diffusers) on one device, with the inputs every part shares."""

    def __init__(self, args, dev: torch.device):
        from diffusers import UNet2DConditionModel
        self.args, self.dev, self.clock = args, dev, Clock(dev)
        torch.manual_seed(0)
        w = args.width
        self.config = dict(SD_V1_UNET, image_size=args.size, model_channels=w, context_dim=args.ctx)
        ours = UNetModel(**self.config)
        perturb_(ours)
        theirs = UNet2DConditionModel(
            sample_size=args.size, in_channels=4, out_channels=4, block_out_channels=(w, 2 * w, 4 * w, 4 * w),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=args.ctx,
            attention_head_dim=8)
        theirs.load_state_dict(compvis_to_diffusers_unet(ours.state_dict(), 2, 4, [0, 1, 2]), strict=True)
        self.ours, self.theirs = ours.to(dev), theirs.to(dev)
        g = torch.Generator(device=dev).manual_seed(1)
        b, s = args.batch, args.size
        self.x = torch.randn(b, 4, s, s, device=dev, generator=g)
        self.t = torch.randint(0, 1000, (b,), device=dev, generator=g)
        self.ctx = torch.randn(b, 77, args.ctx, device=dev, generator=g)
        self.target = torch.randn(self.x.shape, device=dev, generator=g)
        with torch.no_grad():
            diff = (ours(self.x[:2], self.t[:2], context=self.ctx[:2])
                    - theirs(self.x[:2], self.t[:2], encoder_hidden_states=self.ctx[:2]).sample).abs().max().item()
        self.results: dict = {"unet_parity_fp32_max_abs": diff}
        print(f"UNet: {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters, max |ours - diffusers| (fp32) "
              f"{diff:.2e}", flush=True)
        self._half: dict = {}

    def pair(self, a: Callable[[], object], b: Callable[[], object]) -> tuple[float, float]:
        return time_pair(self.clock, a, b, self.args.steps, self.args.warmup)

    def train_steps(self, ours: torch.nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
        x, t, ctx, target = self.x, self.t, self.ctx, self.target
        step_o = train_step(ours, lambda: ours(x, t, context=ctx), target, self.dev)
        step_t = train_step(self.theirs, lambda: self.theirs(x, t, encoder_hidden_states=ctx).sample, target, self.dev)
        return step_o, step_t

    def free(self) -> None:
        self.ours.zero_grad(set_to_none=True)
        self.theirs.zero_grad(set_to_none=True)
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def half(self, dtype: torch.dtype = torch.float16) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Eval copies of both UNets with `dtype` weights (kept for the later parts)."""
        if dtype not in self._half:
            self._half[dtype] = (copy.deepcopy(self.ours).to(dtype).eval().requires_grad_(False),
                                 copy.deepcopy(self.theirs).to(dtype).eval().requires_grad_(False))
        return self._half[dtype]

    # -- parts ------------------------------------------------------------------------------------------------------
    def train(self) -> None:
        step_o, step_t = self.train_steps(self.ours)
        step_o()
        step_t()  # optimizer states exist before the memory is read
        mem = (peak_mb(self.dev, step_o), peak_mb(self.dev, step_t))
        self.train_flops = flops(step_o)
        report(f"UNet train step bf16 (batch {self.args.batch})", *self.pair(step_o, step_t), self.train_flops, mem,
               self.results)
        del step_o, step_t
        self.free()

    def sample(self) -> None:
        x2, t2, c2 = self.x[:2], self.t[:2], self.ctx[:2]
        with torch.inference_mode():
            for label, dtype in (("fp16 weights", torch.float16), ("bf16 weights", torch.bfloat16)):
                oh, th = self.half(dtype)
                fo = lambda: oh(x2, t2, context=c2)  # noqa: E731  (float32 inputs: the network casts them)
                ft = lambda: th(x2.to(dtype), t2, encoder_hidden_states=c2.to(dtype)).sample  # noqa: E731
                err = ((fo().float() - ft().float()).norm() / ft().float().norm()).item()
                name = f"UNet CFG pair, {label}"
                report(name, *self.pair(fo, ft), flops(fo), (peak_mb(self.dev, fo), peak_mb(self.dev, ft)),
                       self.results)
                self.results[name]["rel_diff_vs_diffusers"] = err
            self.ours.eval()
            self.theirs.eval()
            with torch.autocast(self.dev.type, dtype=torch.float16):
                fo = lambda: self.ours(x2, t2, context=c2)  # noqa: E731
                ft = lambda: self.theirs(x2, t2, encoder_hidden_states=c2).sample  # noqa: E731
                report("UNet CFG pair, fp16 autocast", *self.pair(fo, ft), flops(fo),
                       (peak_mb(self.dev, fo), peak_mb(self.dev, ft)), self.results)
            self.ours.train()
            self.theirs.train()
        self.results["unet_weights_mb"] = {d: sum(p.numel() for p in self.ours.parameters()) * s / 2 ** 20
                                           for d, s in (("fp32", 4), ("fp16", 2))}
        oh, th = self.half(torch.float16)
        self.sampling_50("eager", oh, th)

    def sampling_50(self, label: str, net: Callable, th: torch.nn.Module, graphs: bool = False) -> None:
        """50-step CFG sampling of one image: the UNet's time (50 pair forwards) and the whole DDIM loop."""
        from diffusers import DDIMScheduler

        from ldm.core.denoiser import Denoiser, DiscreteSchedule
        from ldm.core.scaling import scaling_for
        from ldm.modules.diffusionmodules.schedule import make_beta_schedule
        from ldm.sampling import CFGDenoiser, get_sigmas, sample
        steps, dev = self.args.sample_steps, self.dev
        betas = torch.as_tensor(make_beta_schedule("linear", SD_SCHEDULE["timesteps"], SD_SCHEDULE["linear_start"],
                                                   SD_SCHEDULE["linear_end"]))
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        cond, uncond = self.ctx[:1], self.ctx[1:2]
        # float timesteps, as the sampler's denoiser passes them (a compiled UNet would recompile on a dtype change)
        x2, t2, c2 = self.x[:2], self.t[:2].float(), torch.cat([uncond, cond])
        mark = torch.compiler.cudagraph_mark_step_begin if graphs else (lambda: None)

        def call_unet(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            mark()
            return net(x, t, context=c)

        def unet_50_ours() -> None:
            for _ in range(steps):
                call_unet(x2, t2, c2)

        dtype = th.dtype  # diffusers takes inputs in its weights' dtype

        def unet_50_theirs() -> None:
            xh, ch = x2.to(dtype), c2.to(dtype)
            for _ in range(steps):
                th(xh, t2, encoder_hidden_states=ch)

        schedule = DiscreteSchedule(alphas_cumprod).to(dev)
        denoiser = CFGDenoiser(Denoiser(lambda x, t, c: call_unet(x, t, c).float(), scaling_for("eps"), schedule),
                               scale=GUIDANCE_SCALE)
        sigmas = get_sigmas(schedule, steps).to(dev)
        noise = self.x[:1]

        def loop_ours() -> torch.Tensor:
            return sample(denoiser, noise, sigmas, "ddim", extra_args={"cond": {"c": cond}, "uncond": {"c": uncond}})

        scheduler = DDIMScheduler(num_train_timesteps=SD_SCHEDULE["timesteps"], beta_start=SD_SCHEDULE["linear_start"],
                                  beta_end=SD_SCHEDULE["linear_end"], beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        ch = c2.to(dtype)

        def loop_theirs() -> torch.Tensor:
            scheduler.set_timesteps(steps, device=dev)
            x = noise
            for t in scheduler.timesteps:
                eps_u, eps_c = th(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=ch).sample.float().chunk(2)
                x = scheduler.step(eps_u + GUIDANCE_SCALE * (eps_c - eps_u), t, x).prev_sample
            return x

        with torch.inference_mode():
            a, b = loop_ours(), loop_theirs()
            rel = ((a - b).norm() / b.norm()).item()
            reps, warm = max(2, self.args.steps // 3), 1
            name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
            report(f"UNet time of {steps}-step CFG sampling, {name}, {label}",
                   *time_pair(self.clock, unet_50_ours, unet_50_theirs, reps, warm), 0, (float("nan"),) * 2,
                   self.results)
            report(f"{steps}-step DDIM CFG loop, {name}, {label}",
                   *time_pair(self.clock, loop_ours, loop_theirs, reps, warm), 0, (float("nan"),) * 2, self.results)
            self.results[f"{steps}-step DDIM CFG loop, {name}, {label}"]["rel_diff_vs_diffusers"] = rel
            print(f"  final latents ours vs diffusers' DDIMScheduler: relative difference {rel:.2e}", flush=True)

    def layout(self) -> None:
        nchw = UNetModel(**self.config, channels_last=False).to(self.dev)
        nchw.load_state_dict(self.ours.state_dict())
        x, t, ctx, target = self.x, self.t, self.ctx, self.target
        step_cl = train_step(self.ours, lambda: self.ours(x, t, context=ctx), target, self.dev)
        step_nc = train_step(nchw, lambda: nchw(x, t, context=ctx), target, self.dev)
        report(f"UNet train step bf16 (batch {self.args.batch}), layout", *self.pair(step_cl, step_nc), 0,
               (peak_mb(self.dev, step_cl), peak_mb(self.dev, step_nc)), self.results, a="channels_last",
               b="contiguous")
        nchw.zero_grad(set_to_none=True)
        self.free()
        oh, _ = self.half(torch.float16)
        nh = copy.deepcopy(nchw).half().eval().requires_grad_(False)
        x2, t2, c2 = x[:2], t[:2], ctx[:2]
        with torch.inference_mode():
            report("UNet CFG pair, fp16 weights, layout", *self.pair(lambda: oh(x2, t2, context=c2),
                                                                    lambda: nh(x2, t2, context=c2)),
                   0, (float("nan"),) * 2, self.results, a="channels_last", b="contiguous")

    def compile_sample(self) -> None:
        oh, th = self.half(torch.float16)
        for i, mode in enumerate(self.args.compile_modes):
            if i:
                torch._dynamo.reset()  # each mode compiles afresh (inductor's on-disk cache still serves its kernels)
            try:
                self._compiled_sampling(oh, th, mode)
            except Exception as e:  # the next mode may still work
                traceback.print_exc()
                self.results[f"compile {mode} (sampling): error"] = f"{type(e).__name__}: {e}"
            self.dump()

    def _compiled_sampling(self, oh: torch.nn.Module, th: torch.nn.Module, mode: str) -> None:
        """One compile mode: compile time, agreement with eager, then the 50-step sampling."""
        x2, t2, c2 = self.x[:2], self.t[:2].float(), self.ctx[:2]  # the dtypes the sampling loop passes
        compiled = torch.compile(oh, mode=None if mode == "default" else mode)
        graphs = mode == "reduce-overhead"
        with torch.inference_mode():
            secs = first_call_s(self.dev, lambda: compiled(x2, t2, context=c2))
            if graphs:  # cudagraph trees record on a later call
                for _ in range(3):
                    torch.compiler.cudagraph_mark_step_begin()
                    compiled(x2, t2, context=c2)
            torch.compiler.cudagraph_mark_step_begin()
            err = ((compiled(x2, t2, context=c2).float() - oh(x2, t2, context=c2).float()).norm()
                   / oh(x2, t2, context=c2).float().norm()).item()
        print(f"compiled ({mode}): first call {secs:.1f} s, relative difference to eager fp16 {err:.2e}",
              flush=True)
        self.results[f"compile {mode} (sampling): first call s"] = secs
        self.results[f"compile {mode} (sampling): rel diff to eager"] = err
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile fails fast, not at the time limit
            self.sampling_50(f"ours compiled ({mode})", compiled, th, graphs=graphs)

    def compile_train(self) -> None:
        compiled = torch.compile(self.ours)
        step_o, step_t = self.train_steps(compiled)
        secs = first_call_s(self.dev, step_o)
        print(f"compiled train step (default mode): first call {secs:.1f} s", flush=True)
        self.results["compile default (train): first call s"] = secs
        step_t()
        n = getattr(self, "train_flops", 0) or flops(self.train_steps(self.ours)[0])
        report(f"UNet train step bf16 (batch {self.args.batch}), ours compiled", *self.pair(step_o, step_t), n,
               (peak_mb(self.dev, step_o), peak_mb(self.dev, step_t)), self.results)
        del step_o, step_t
        self.free()

    def vae(self) -> None:
        bench_vae(self.args, self.dev, self.clock, self.results)

    def dump(self) -> None:
        if self.args.json:
            Path(self.args.json).write_text(json.dumps({**self.meta, **self.results}, indent=1))


def bench_vae(args, dev: torch.device, clock: Clock, results: dict) -> None:
    from diffusers import AutoencoderKL as DiffusersVAE

    from ldm.models.autoencoder import AutoencoderKL
    torch.manual_seed(0)
    dd = SD_VAE_DD if args.width == 320 else dict(SD_VAE_DD, ch=32)  # a small VAE along with a small UNet
    ours = AutoencoderKL(ddconfig=dd, lossconfig=None, embed_dim=4)
    perturb_(ours)
    theirs = DiffusersVAE(**{k: v for k, v in diffusers_autoencoder_config(dd).items()
                             if k not in ("scaling_factor",)})
    theirs.load_state_dict(compvis_to_diffusers_vae(ours.state_dict()), strict=True)
    ours, theirs = ours.to(dev), theirs.to(dev)
    z = torch.randn(1, 4, args.size, args.size, device=dev)
    with torch.no_grad():
        diff = (ours.decode(z) - theirs.decode(z).sample).abs().max().item()
    print(f"VAE: max |ours - diffusers| decode (fp32) {diff:.2e}", flush=True)
    results["vae_parity_fp32_max_abs"] = diff
    side = 4 * args.size
    x = torch.rand(4, 3, side, side, device=dev) * 2 - 1

    def call_o():
        return ours.decode(ours.encode(x).sample())

    def call_t():
        return theirs.decode(theirs.encode(x).latent_dist.sample()).sample
    step_o = train_step(ours, call_o, x, dev, loss="l1")
    step_t = train_step(theirs, call_t, x, dev, loss="l1")
    step_o()
    step_t()
    mem = (peak_mb(dev, step_o), peak_mb(dev, step_t))
    report(f"VAE train step bf16 (batch 4, {side}px)", *time_pair(clock, step_o, step_t, args.steps, args.warmup),
           flops(step_o), mem, results)
    del step_o, step_t
    oh, th = copy.deepcopy(ours).half().eval(), copy.deepcopy(theirs).half().eval()
    with torch.inference_mode():
        fo = lambda: oh.decode(z)  # noqa: E731
        ft = lambda: th.decode(z.half()).sample  # noqa: E731
        report(f"VAE decode {8 * args.size}px, fp16 weights", *time_pair(clock, fo, ft, args.steps, args.warmup),
               flops(fo), (peak_mb(dev, fo), peak_mb(dev, ft)), results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed calls of each side (medians reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sample_steps", type=int, default=50, help="sampling steps of the CFG sampling parts")
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    p.add_argument("--compile_modes", nargs="*", default=["default", "reduce-overhead"])
    p.add_argument("--json", default=None, help="write the results here too (after each part)")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu runs the code at small sizes")
    p.add_argument("--width", type=int, default=320, help="UNet model_channels (320: SD v1); the VAE scales along")
    p.add_argument("--size", type=int, default=64, help="latent side (64: 512 px)")
    p.add_argument("--ctx", type=int, default=768, help="context width (768: SD v1)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import diffusers
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "args": vars(args)}
    print(f"{meta['device']}, torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers "
          f"{diffusers.__version__}", flush=True)
    bench = Bench(args, dev)
    bench.meta = meta
    failed = []
    for part in PARTS:
        if part in args.parts:
            t0 = time.perf_counter()
            print(f"-- {part}", flush=True)
            try:
                getattr(bench, part)()
            except Exception as e:  # a one-shot run on a lent GPU: report the failure, go on with the next part
                traceback.print_exc()
                bench.results[f"part {part}: error"] = f"{type(e).__name__}: {e}"
                failed.append(part)
            bench.results[f"part {part}: s"] = time.perf_counter() - t0
            bench.dump()
    if failed:
        print(f"failed parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
