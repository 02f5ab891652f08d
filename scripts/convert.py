"""Convert checkpoints: export for sharing (.safetensors or CompVis .ckpt, fp32 / fp16 / bf16, EMA weights only,
without the training-only parts), and Stable Diffusion v1 layouts to and from diffusers pipeline folders.

    python scripts/convert.py --ckpt logs/<run>/checkpoints/last.ckpt --out model.safetensors --dtype fp16 --ema-only
    python scripts/convert.py --ckpt ae.ckpt --out ae.safetensors --strip-training
    python scripts/convert.py --ckpt sd-v1-4.ckpt --config configs/stable-diffusion/v1-inference.yaml --to-diffusers out/
    python scripts/convert.py --from-diffusers sd-folder/ --config configs/stable-diffusion/v1-inference.yaml --out sd.safetensors
    python scripts/convert.py --ckpt vq-f4.ckpt --config configs/autoencoder/autoencoder_vq_f4.yaml --to-diffusers vq-f4/

The result loads wherever a checkpoint does (ldm.util.load_model_from_config, --ckpt of the scripts, ckpt_path).
"""
from __future__ import annotations

import argparse
import sys

from ldm.checkpoint import CheckpointError
from ldm.convert.export import ExportDType, export_checkpoint
from ldm.util import ConfigError


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to read (.ckpt, .pt or .safetensors)")
    p.add_argument("--out", help="file to write: .safetensors or .ckpt")
    p.add_argument("--config", help="the model's config (for --to-diffusers / --from-diffusers)")
    p.add_argument("--to-diffusers", metavar="FOLDER",
                   help="write a diffusers pipeline folder (SD v1 / v2 / v2-v / inpainting / x4), or an AutoencoderKL / "
                        "VQModel folder for a first-stage config")
    p.add_argument("--from-diffusers", metavar="FOLDER", help="read a diffusers pipeline folder into --config's layout")
    p.add_argument("--no-ema", action="store_true", help="--to-diffusers: the training weights, not the EMA ones")
    p.add_argument("--dtype", default="fp32", choices=[d.value for d in ExportDType])
    p.add_argument("--ema-only", action="store_true", help="the EMA weights in place of the training weights")
    p.add_argument("--strip-training", action="store_true", help="drop the training-only parts (loss.*)")
    p.add_argument("--unsafe-load", action="store_true", help="allow pickled objects in the input checkpoint")
    return p


def diffusers_conversion(opt: argparse.Namespace):
    """--to-diffusers (needs --ckpt) or --from-diffusers (needs --out): SD v1 layouts, with the model's --config."""
    from ldm.convert.diffusers_pipeline import from_diffusers_pipeline, to_diffusers_pipeline
    from ldm.util import instantiate_from_config, load_config, load_model_from_config
    if not opt.config:
        raise ValueError("--to-diffusers / --from-diffusers need the model's --config")
    cfg = load_config(opt.config)
    if opt.to_diffusers:
        if not opt.ckpt:
            raise ValueError("--to-diffusers needs --ckpt")
        model = load_model_from_config(cfg, opt.ckpt, allow_pickle=opt.unsafe_load)
        if "ddconfig" in cfg.model.get("params", {}):  # a first stage: AutoencoderKL or VQModel folder
            from ldm.convert.diffusers_vae import save_diffusers_autoencoder
            return save_diffusers_autoencoder(model, cfg.model.params, opt.to_diffusers)
        return to_diffusers_pipeline(model, cfg, opt.to_diffusers, use_ema=not opt.no_ema)
    if not opt.out:
        raise ValueError("--from-diffusers needs --out")
    model = instantiate_from_config(cfg.model)
    model.load_state_dict(from_diffusers_pipeline(opt.from_diffusers, model, cfg), strict=True)
    return export_checkpoint(model, opt.out, dtype=opt.dtype)


def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    try:
        if opt.to_diffusers or opt.from_diffusers:
            path = diffusers_conversion(opt)
        else:
            if not (opt.ckpt and opt.out):
                raise ValueError("give --ckpt and --out (or --to-diffusers / --from-diffusers with --config)")
            path = export_checkpoint(opt.ckpt, opt.out, dtype=opt.dtype, ema_only=opt.ema_only,
                                     strip_training=opt.strip_training, allow_pickle=opt.unsafe_load)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
