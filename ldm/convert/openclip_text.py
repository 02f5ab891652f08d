"""OpenCLIP text tower (Stable Diffusion 2's `FrozenOpenCLIPEmbedder`) <-> transformers `CLIPTextModel`, both ways.

open_clip packs q, k, v in one `in_proj_weight`; transformers keeps three projections. SD2 reads the penultimate
layer, so its diffusers text encoder has one layer fewer (23 of ViT-H's 24). What that layout has no place for
(the unused last blocks, `text_projection`, `logit_scale`) is returned separately, so the way back is bit-exact.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
          "mlp.c_proj": "mlp.fc2"}


def clip_text_config(model, layers_used: int, max_length: int = 77, pad_token_id: int = 0):
    """transformers CLIPTextConfig of an open_clip text tower (`model`: the embedder's `model`)."""
    from transformers import CLIPTextConfig
    block = model.transformer.resblocks[0]
    width = model.token_embedding.weight.shape[1]
    return CLIPTextConfig(vocab_size=model.token_embedding.weight.shape[0], hidden_size=width,
                          intermediate_size=block.mlp.c_fc.weight.shape[0], num_hidden_layers=layers_used,
                          num_attention_heads=block.attn.num_heads, max_position_embeddings=max_length,
                          hidden_act="gelu", layer_norm_eps=float(model.ln_final.eps),
                          projection_dim=model.text_projection.shape[1], pad_token_id=pad_token_id,
                          bos_token_id=49406, eos_token_id=49407)


def openclip_to_clip_text(sd: Mapping[str, torch.Tensor], layers_used: int,
                          prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(CLIPTextModel state dict with keys under `prefix`, the open_clip tensors it has no place for)."""
    out: dict[str, torch.Tensor] = {}
    unused: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj|.+)[._](weight|bias)$", k)
        if k == "token_embedding.weight":
            out[prefix + "embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out[prefix + "embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out[prefix + "final_layer_norm." + k.split(".", 1)[1]] = v
        elif m and int(m[1]) < layers_used:
            layer, name, kind = int(m[1]), m[2], m[3]
            base = f"{prefix}encoder.layers.{layer}."
            if name == "attn.in_proj":
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{base}self_attn.{part}.{kind}"] = chunk.clone()
            else:
                out[f"{base}{_LAYER[name]}.{kind}"] = v
        else:
            unused[k] = v
    return out, unused


def clip_text_to_openclip(sd: Mapping[str, torch.Tensor], unused: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of openclip_to_clip_text (keys with or without transformers 4's `text_model.` prefix)."""
    inverse_layer = {b: a for a, b in _LAYER.items()}
    out: dict[str, torch.Tensor] = dict(unused)
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".", 1)[1]] = v
        elif m and m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2].rsplit(".", 1)[1]] = v
        elif m:
            out[f"transformer.resblocks.{m[1]}.{inverse_layer[m[2]]}.{m[3]}"] = v
        elif k.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"CLIPTextModel key with no open_clip counterpart: {k}")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"],
                                                                               parts["v_proj"]])
    return out
