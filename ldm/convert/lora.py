"""LoRA adapter files in the layouts users share, both ways:

- `ldm`: this framework's own (the UNet's layer names, "<layer>.lora_A.weight" / ".lora_B.weight", alpha and
  rank in the file's metadata);
- `diffusers`: peft keys under `unet.` with diffusers' module names; `pipeline.load_lora_weights(file)` loads
  it (alpha / rank is folded into B, so the file needs no alpha);
- `kohya`: the community tools' `lora_unet_<module path, dots as underscores>.lora_down.weight` /
  `.lora_up.weight` / `.alpha`.
A file's layout is recognised from its keys.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from ldm.convert.diffusers_pipeline import unet_layout
from ldm.convert.diffusers_unet import compvis_to_diffusers_unet
from ldm.errors import InputError
from ldm.lora import LORA_A, LORA_B, Adapter

DIFFUSERS_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"
KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
META_ALPHA, META_RANK, META_LAYOUT = "ldm.lora_alpha", "ldm.lora_rank", "ldm.lora_layout"


class LoraLayout(str, Enum):
    """Key naming of an adapter file (see the module docstring)."""
    LDM = "ldm"
    DIFFUSERS = "diffusers"
    KOHYA = "kohya"


def linear_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's linear layers (adapter wrappers seen through: peft's `base_layer`)."""
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and ".lora_" not in name:
            names.append(name[: -len(".base_layer")] if name.endswith(".base_layer") else name)
    return names


def diffusers_names(unet: nn.Module) -> dict[str, str]:
    """{our layer name: diffusers' UNet2DConditionModel module name} for the UNet's transformer linear layers."""
    nrb = unet.num_res_blocks
    lay = unet_layout({"channel_mult": unet.channel_mult, "num_res_blocks": nrb,
                       "attention_resolutions": unet.attention_resolutions})
    names = {}
    for layer in linear_layers(unet):
        if ".transformer_blocks." not in layer:
            continue
        (theirs,) = compvis_to_diffusers_unet({f"{layer}.weight": torch.empty(0)}, lay["num_res_blocks"],
                                              lay["levels"], lay["attention_levels"])
        names[layer] = theirs[: -len(".weight")]
    return names


def to_layout(adapter: Adapter, unet: nn.Module, layout: Union[LoraLayout, str]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under `layout`'s keys (float32, contiguous)."""
    layout = LoraLayout(layout)
    out: dict[str, torch.Tensor] = {}
    names = diffusers_names(unet) if layout is not LoraLayout.LDM else {}
    for layer, (a, b) in adapter.pairs.items():
        a, b = a.float().contiguous(), b.float().contiguous()
        if layout is LoraLayout.LDM:
            out[f"{layer}.{LORA_A}.weight"], out[f"{layer}.{LORA_B}.weight"] = a, b
            continue
        if layer not in names:
            raise InputError(f"LoRA layer {layer} has no {layout.value} name (only transformer layers are shared)")
        if layout is LoraLayout.DIFFUSERS:
            key = DIFFUSERS_PREFIX + names[layer]
            out[f"{key}.{LORA_A}.weight"] = a
            out[f"{key}.{LORA_B}.weight"] = (b * adapter.scaling).contiguous()
        else:
            key = KOHYA_PREFIX + names[layer].replace(".", "_")
            out[key + KOHYA_DOWN], out[key + KOHYA_UP] = a, b
            out[key + KOHYA_ALPHA] = torch.tensor(adapter.scaling * a.shape[0])
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> LoraLayout:
    """The layout of an adapter file's keys; an error naming an unknown or mixed one."""
    keys = list(sd)
    if keys and all(k.startswith(KOHYA_PREFIX) for k in keys):
        return LoraLayout.KOHYA
    if keys and all(k.startswith(DIFFUSERS_PREFIX) for k in keys):
        return LoraLayout.DIFFUSERS
    if keys and all(k.endswith((f".{LORA_A}.weight", f".{LORA_B}.weight")) for k in keys):
        return LoraLayout.LDM
    other = [k for k in keys if k.startswith(("text_encoder", "lora_te"))]
    if other:
        raise InputError(f"LoRA file has text-encoder adapters ({other[0]}, ...): only UNet adapters are supported")
    raise InputError(f"LoRA file: keys of no known layout (ldm, diffusers, kohya), e.g. {keys[:2]}")


def from_layout(sd: Mapping[str, torch.Tensor], unet: nn.Module, metadata: Optional[Mapping[str, str]] = None
                ) -> Adapter:
    """An Adapter from a file's tensors in any layout, its layers named as in `unet`."""
    layout = detect_layout(sd)
    metadata = metadata or {}
    if layout is LoraLayout.LDM:
        adapter = Adapter.from_state_dict(sd)
        if META_ALPHA in metadata and META_RANK in metadata:
            adapter.scaling = float(metadata[META_ALPHA]) / float(metadata[META_RANK])
        return adapter
    ours = {theirs: layer for layer, theirs in diffusers_names(unet).items()}
    pairs = {}
    if layout is LoraLayout.DIFFUSERS:
        flat = {k[len(DIFFUSERS_PREFIX):]: v for k, v in sd.items()}
        adapter = Adapter.from_state_dict(flat)
        for name, pair in adapter.pairs.items():
            if name not in ours:
                raise InputError(f"LoRA file: diffusers layer unet.{name} is not in this model's UNet")
            pairs[ours[name]] = pair
        return Adapter(pairs, 1.0)
    kohya = {theirs.replace(".", "_"): layer for theirs, layer in ours.items()}
    stems = {k[: -len(KOHYA_DOWN)] for k in sd if k.endswith(KOHYA_DOWN)}
    for stem in sorted(stems):
        name = stem[len(KOHYA_PREFIX):]
        if name not in kohya or stem + KOHYA_UP not in sd:
            raise InputError(f"LoRA file: kohya layer {stem} is not in this model's UNet (or has no lora_up)")
        down, up = sd[stem + KOHYA_DOWN], sd[stem + KOHYA_UP]
        alpha = float(sd[stem + KOHYA_ALPHA]) if stem + KOHYA_ALPHA in sd else float(down.shape[0])
        pairs[kohya[name]] = (down, up * (alpha / down.shape[0]))  # alpha / rank folded into B
    if len(sd) != sum(1 + (s + KOHYA_ALPHA in sd) + 1 for s in stems):
        raise InputError("LoRA file: kohya keys other than lora_down / lora_up / alpha")
    return Adapter(pairs, 1.0)


def save_adapter(path: Union[str, Path], adapter: Adapter, unet: nn.Module,
                 layout: Union[LoraLayout, str] = LoraLayout.DIFFUSERS,
                 metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write the adapter as .safetensors in `layout` (atomically; an existing file is the caller's to check)."""
    from safetensors.torch import save_file

    from ldm.files import atomic_path

    layout = LoraLayout(layout)
    meta = {"format": "pt", META_LAYOUT: layout.value, **dict(metadata or {})}
    if layout is LoraLayout.LDM:
        meta |= {META_ALPHA: str(adapter.scaling * adapter.rank()), META_RANK: str(adapter.rank())}
    with atomic_path(path) as tmp:
        save_file(to_layout(adapter, unet, layout), str(tmp), metadata=meta)
    return Path(path)


def load_adapter(path: Union[str, Path], unet: nn.Module) -> Adapter:
    """An adapter file (.safetensors, any layout) as an Adapter for `unet`; errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file {path}: not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise InputError(f"LoRA file {path}: not a readable .safetensors file ({e})") from None
    try:
        return from_layout(sd, unet, metadata)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """FILE or FILE:SCALE (the scale a float; default 1) as (path, scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass  # a colon inside the path itself
    return Path(spec), 1.0


def merge_lora_files(model, specs) -> list[tuple[Path, float, int]]:
    """Merge each FILE[:SCALE] adapter into a LatentDiffusion's UNet (and EMA) weights, in order; returns
    (file, scale, layers) per adapter. Several adapters add up, each with its own scale."""
    from ldm.lora import merge_into_model

    done: list[tuple[Path, float, int]] = []
    specs = list(specs)
    if not specs:
        return done
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None:
        raise InputError(f"LoRA adapters go into a diffusion model's UNet; this is a {type(model).__name__}")
    for spec in specs:
        path, scale = parse_lora_spec(str(spec))
        adapter = load_adapter(path, unet)
        done.append((path, scale, merge_into_model(model, [(adapter, scale)])))
    return done
