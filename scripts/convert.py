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
from pathlib import Path

from ldm.convert.export import ExportDType, export_checkpoint
from ldm.errors import InputError, entry_point
from ldm.files import check_output_dir, check_outputs


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file or write into a non-empty --to-diffusers folder (never the input)")
    return p


def check_paths(opt: argparse.Namespace) -> None:
    """Before any work: the inputs exist, and the output is not an input nor (without --overwrite) an existing file."""
    for flag, path in (("--ckpt", opt.ckpt), ("--config", opt.config)):
        if path and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")
    if opt.from_diffusers and not Path(opt.from_diffusers).is_dir():
        raise InputError(f"--from-diffusers {opt.from_diffusers}: no such folder")
    inputs = [p for p in (opt.ckpt, opt.config, opt.from_diffusers) if p]
    if opt.out:
        check_outputs([opt.out], inputs, overwrite=opt.overwrite, flag="--out")
    if opt.to_diffusers:
        check_output_dir(opt.to_diffusers, inputs, overwrite=opt.overwrite, flag="--to-diffusers")


def diffusers_conversion(opt: argparse.Namespace):
    """--to-diffusers (needs --ckpt) or --from-diffusers (needs --out): SD v1 layouts, with the model's --config."""
    from ldm.convert.diffusers_pipeline import from_diffusers_pipeline, to_diffusers_pipeline
    from ldm.util import instantiate_from_config, load_config, load_model_from_config
    if not opt.config:
        raise InputError("--to-diffusers / --from-diffusers need the model's --config")
    cfg = load_config(opt.config)
    if opt.to_diffusers:
        if not opt.ckpt:
            raise InputError("--to-diffusers needs --ckpt")
        model = load_model_from_config(cfg, opt.ckpt, allow_pickle=opt.unsafe_load)
        if "ddconfig" in cfg.model.get("params", {}):  # a first stage: AutoencoderKL or VQModel folder
            from ldm.convert.diffusers_vae import save_diffusers_autoencoder
            return save_diffusers_autoencoder(model, cfg.model.params, opt.to_diffusers)
        return to_diffusers_pipeline(model, cfg, opt.to_diffusers, use_ema=not opt.no_ema)
    if not opt.out:
        raise InputError("--from-diffusers needs --out")
    model = instantiate_from_config(cfg.model)
    model.load_state_dict(from_diffusers_pipeline(opt.from_diffusers, model, cfg), strict=True)
    return export_checkpoint(model, opt.out, dtype=opt.dtype, overwrite=opt.overwrite)


@entry_point
def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    check_paths(opt)
    if opt.to_diffusers or opt.from_diffusers:
        path = diffusers_conversion(opt)
    else:
        if not (opt.ckpt and opt.out):
            raise InputError("give --ckpt and --out (or --to-diffusers / --from-diffusers with --config)")
        path = export_checkpoint(opt.ckpt, opt.out, dtype=opt.dtype, ema_only=opt.ema_only,
                                 strip_training=opt.strip_training, allow_pickle=opt.unsafe_load,
                                 overwrite=opt.overwrite)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
