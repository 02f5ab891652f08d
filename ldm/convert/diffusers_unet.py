"""State-dict conversion between the CompVis UNet layout and diffusers' UNet2DConditionModel, both ways."""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
        "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _res(rest: str) -> str:
    for a, b in _RES.items():
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    raise KeyError(rest)


def compvis_to_diffusers_unet(sd: Mapping[str, torch.Tensor], num_res_blocks: int, num_levels: int,
                              attention_levels: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rename CompVis UNet keys to diffusers' (SD-style: ResBlocks, SpatialTransformers, conv up/down-samplers)."""
    out: dict[str, torch.Tensor] = {}
    per = num_res_blocks + 1
    for key, v in sd.items():
        new = None
        if key.startswith("time_embed.0."):
            new = "time_embedding.linear_1." + key.split(".")[-1]
        elif key.startswith("time_embed.2."):
            new = "time_embedding.linear_2." + key.split(".")[-1]
        elif key.startswith("input_blocks.0.0."):
            new = "conv_in." + key.split(".")[-1]
        elif key.startswith("out.0."):
            new = "conv_norm_out." + key.split(".")[-1]
        elif key.startswith("out.2."):
            new = "conv_out." + key.split(".")[-1]
        elif key.startswith("label_emb.0.0."):
            new = "class_embedding.linear_1." + key.split(".")[-1]
        elif key.startswith("label_emb.0.2."):
            new = "class_embedding.linear_2." + key.split(".")[-1]
        elif key.startswith("label_emb.weight"):
            new = "class_embedding.weight"
        else:
            m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key)
            if m:
                i, sub, rest = int(m[1]), int(m[2]), m[3]
                level, j = (i - 1) // per, (i - 1) % per
                if j == num_res_blocks:  # down-sampler
                    new = f"down_blocks.{level}.downsamplers.0.conv." + rest.split(".", 1)[1]
                elif sub == 0:
                    new = f"down_blocks.{level}.resnets.{j}." + _res(rest)
                else:
                    new = f"down_blocks.{level}.attentions.{j}." + rest
            m = re.match(r"middle_block\.(\d+)\.(.*)", key)
            if m:
                sub, rest = int(m[1]), m[2]
                new = (f"mid_block.resnets.{sub // 2}." + _res(rest)) if sub in (0, 2) else "mid_block.attentions.0." + rest
            m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key)
            if m:
                i, sub, rest = int(m[1]), int(m[2]), m[3]
                level, j = i // per, i % per
                has_attn = (num_levels - 1 - level) in attention_levels
                if sub == 0:
                    new = f"up_blocks.{level}.resnets.{j}." + _res(rest)
                elif sub == 1 and has_attn:
                    new = f"up_blocks.{level}.attentions.{j}." + rest
                else:
                    new = f"up_blocks.{level}.upsamplers.0." + rest
        if new is None:
            raise KeyError(f"no diffusers name for CompVis key '{key}'")
        out[new] = v
    return out


def diffusers_to_compvis_unet(sd: Mapping[str, torch.Tensor], compvis_keys: Sequence[str], num_res_blocks: int,
                              num_levels: int, attention_levels: Sequence[int]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> CompVis keys (`compvis_keys`: the target UNet's own keys);
    the inverse of compvis_to_diffusers_unet on that layout."""
    names = compvis_to_diffusers_unet({k: torch.empty(0) for k in compvis_keys}, num_res_blocks, num_levels,
                                      attention_levels)
    inverse = dict(zip(names.keys(), compvis_keys))
    unknown = sorted(set(sd) - set(inverse))
    if unknown:
        raise KeyError(f"diffusers UNet keys with no CompVis counterpart in this model: {unknown[:5]}")
    return {inverse[k]: v for k, v in sd.items()}
