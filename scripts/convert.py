"""Convert checkpoints: export for sharing (.safetensors or CompVis .ckpt, fp32 / fp16 / bf16, EMA weights only,
without the training-only parts), and Stable Diffusion v1 layouts to and from diffusers pipeline folders.

    python scripts/convert.py --ckpt logs/<run>/checkpoints/last.ckpt --out model.safetensors --dtype fp16 --ema-only
    python scripts/convert.py --ckpt ae.ckpt --out ae.safetensors --strip-training
    python scripts/convert.py --ckpt sd-v1-4.ckpt --config configs/stable-diffusion/v1-inference.yaml --to-diffusers out/
    python scripts/convert.py --from-diffusers sd-folder/ --config configs/stable-diffusion/v1-inference.yaml --out sd.safetensors
    python scripts/convert.py --ckpt vq-f4.ckpt --config configs/autoencoder/autoencoder_vq_f4.yaml --to-diffusers vq-f4/
    python scripts/convert.py --ckpt sd.ckpt --config v1-inference.yaml --merge-lora style.safetensors:0.8 --out sd-style.safetensors
    python scripts/convert.py --ckpt logs/<lora run>/checkpoints/last.ckpt --lora-out style.safetensors --lora-layout kohya
    python scripts/convert.py --ckpt logs/<fsdp run, state_dict: sharded>/checkpoints/last.ckpt --out model.ckpt

The result loads wherever a checkpoint does (ldm.util.load_model_from_config, --ckpt of the scripts, ckpt_path).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldm.checkpoint import checkpoint_exists
from ldm.cli import apply_loras, check_lora_files
from ldm.convert.export import ExportDType, export_checkpoint
from ldm.convert.lora import LoraLayout, parse_lora_spec, save_adapter
from ldm.errors import InputError, entry_point
from ldm.files import check_output_dir, check_outputs


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ckpt", help="checkpoint to read (.ckpt, .pt or .safetensors, or an FSDP run's sharded folder)")
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
    p.add_argument("--merge-lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge LoRA adapters (any layout) into the UNet and EMA weights before writing (needs --config); "
                        "repeat for several")
    p.add_argument("--lora-out", metavar="FILE",
                   help="write the LoRA adapters of a LoRA run's --ckpt (its EMA weights unless --no-ema) as .safetensors")
    p.add_argument("--lora-layout", default=LoraLayout.DIFFUSERS.value, choices=[x.value for x in LoraLayout],
                   help="--lora-out's key names: diffusers (pipeline.load_lora_weights), kohya, or ldm (this framework)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file or write into a non-empty --to-diffusers folder (never the input)")
    return p


def check_paths(opt: argparse.Namespace) -> None:
    """Before any work: the inputs exist, and the output is not an input nor (without --overwrite) an existing file."""
    for flag, path in (("--ckpt", opt.ckpt), ("--config", opt.config)):
        if path and not (checkpoint_exists(path) if flag == "--ckpt" else Path(path).is_file()):
            raise InputError(f"{flag} {path}: no such file" + (" (nor a sharded checkpoint folder)" if flag == "--ckpt"
                                                               and Path(path).is_dir() else ""))
    check_lora_files(opt.merge_lora)
    if opt.merge_lora and not (opt.config and opt.ckpt):
        raise InputError("--merge-lora needs the model's --ckpt and --config")
    if opt.from_diffusers and not Path(opt.from_diffusers).is_dir():
        raise InputError(f"--from-diffusers {opt.from_diffusers}: no such folder")
    inputs = [p for p in (opt.ckpt, opt.config, opt.from_diffusers) if p] + [str(parse_lora_spec(s)[0])
                                                                           for s in opt.merge_lora]
    if opt.out:
        check_outputs([opt.out], inputs, overwrite=opt.overwrite, flag="--out")
    if opt.to_diffusers:
        check_output_dir(opt.to_diffusers, inputs, overwrite=opt.overwrite, flag="--to-diffusers")
    if opt.lora_out:
        check_outputs([opt.lora_out], inputs, overwrite=opt.overwrite, flag="--lora-out")


def export_lora(opt: argparse.Namespace) -> Path:
    """--lora-out: the adapters of a LoRA run (its config: --config, else the run's own) in --lora-layout."""
    from ldm.lora import Adapter, lora_state_dict
    from ldm.runs import find_run_config
    from ldm.util import load_config, load_model_from_config
    if not opt.ckpt:
        raise InputError("--lora-out needs the LoRA run's --ckpt")
    cfg = load_config(opt.config or find_run_config(opt.ckpt))
    model = load_model_from_config(cfg, opt.ckpt, allow_pickle=opt.unsafe_load)
    if getattr(model, "finetuning", None) is None:
        raise InputError(f"--lora-out: {opt.ckpt} is not a LoRA run (its config has no model.params.lora_config)")
    with (model.ema_scope("export") if model.use_ema and not opt.no_ema else torch.no_grad()):
        sd = lora_state_dict(model.model.diffusion_model)
    adapter = Adapter.from_state_dict(sd, model.finetuning.settings.scaling)
    return save_adapter(opt.lora_out, adapter, model.model.diffusion_model, opt.lora_layout,
                        metadata={"ldm.base_sha256": model.finetuning.base["sha256"]})


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
        apply_loras(model, opt.merge_lora)
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
    if opt.lora_out:
        path = export_lora(opt)
    elif opt.to_diffusers or opt.from_diffusers:
        path = diffusers_conversion(opt)
    else:
        if not (opt.ckpt and opt.out):
            raise InputError("give --ckpt and --out (or --to-diffusers / --from-diffusers with --config)")
        source = opt.ckpt
        if opt.merge_lora:  # the model with the adapters merged is what is written
            from ldm.util import load_config, load_model_from_config
            source = load_model_from_config(load_config(opt.config), opt.ckpt, allow_pickle=opt.unsafe_load)
            apply_loras(source, opt.merge_lora)
        path = export_checkpoint(source, opt.out, dtype=opt.dtype, ema_only=opt.ema_only,
                                 strip_training=opt.strip_training, allow_pickle=opt.unsafe_load,
                                 overwrite=opt.overwrite)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
