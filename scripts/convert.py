"""Export a checkpoint for sharing: .safetensors or CompVis .ckpt, fp32 / fp16 / bf16, EMA weights only, without
the training-only parts (the autoencoder loss: discriminator, LPIPS).

    python scripts/convert.py --ckpt logs/<run>/checkpoints/last.ckpt --out model.safetensors --dtype fp16 --ema-only
    python scripts/convert.py --ckpt ae.ckpt --out ae.safetensors --strip-training

The result loads wherever a checkpoint does (ldm.util.load_model_from_config, --ckpt of the scripts, ckpt_path).
"""
from __future__ import annotations

import argparse
import sys

from ldm.checkpoint import CheckpointError
from ldm.convert.export import ExportDType, export_checkpoint


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint to read (.ckpt, .pt or .safetensors)")
    p.add_argument("--out", required=True, help="file to write: .safetensors or .ckpt")
    p.add_argument("--dtype", default="fp32", choices=[d.value for d in ExportDType])
    p.add_argument("--ema-only", action="store_true", help="the EMA weights in place of the training weights")
    p.add_argument("--strip-training", action="store_true", help="drop the training-only parts (loss.*)")
    p.add_argument("--unsafe-load", action="store_true", help="allow pickled objects in the input checkpoint")
    return p


def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    try:
        path = export_checkpoint(opt.ckpt, opt.out, dtype=opt.dtype, ema_only=opt.ema_only,
                                 strip_training=opt.strip_training, allow_pickle=opt.unsafe_load)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
