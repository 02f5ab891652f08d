"""State-dict conversion between the CompVis autoencoders (`AutoencoderKL`, `VQModel`: encoder.down.i.block.j,
attention as 1x1 convolutions) and diffusers' `AutoencoderKL` / `VQModel` (down_blocks / up_blocks with reversed
decoder order, linear attention projections), both ways; the inverse is the forward renaming inverted on the
model's own keys. The codebook (`quantize.embedding.weight`) and quant convolutions keep their names."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional

import torch

_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"norm_out": "conv_norm_out"}


def _num_levels(keys) -> int:
    return 1 + max(int(m[1]) for k in keys if (m := re.match(r"encoder\.down\.(\d+)\.", k)))


def compvis_vae_key(key: str, levels: int) -> str:
    """The diffusers name of one CompVis autoencoder key (`levels`: resolutions of the encoder)."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    m = re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|attn\.(\d+)|downsample|upsample)\.(.*)", rest)
    if m:
        kind, level, what, j, a, tail = m[1], int(m[2]), m[3], m[4], m[5], m[6]
        idx = level if kind == "down" else levels - 1 - level  # diffusers' decoder runs from the lowest resolution
        name = f"{kind}_blocks.{idx}"
        head, _, leaf = tail.partition(".")
        if j is not None:
            return f"{part}.{name}.resnets.{j}.{_RESNET.get(head, head)}.{leaf}"
        if a is not None:  # attention at this resolution (attn_resolutions): Attn{Down,Up}*Block2D in diffusers
            return f"{part}.{name}.attentions.{a}.{_ATTN[head]}.{leaf}"
        return f"{part}.{name}.{what}rs.0.{tail}"  # downsample -> downsamplers.0, upsample -> upsamplers.0
    m = re.match(r"mid\.(block_1|block_2|attn_1)\.([^.]+)\.(.*)", rest)
    if m:
        if m[1] == "attn_1":
            return f"{part}.mid_block.attentions.0.{_ATTN[m[2]]}.{m[3]}"
        return f"{part}.mid_block.resnets.{int(m[1][-1]) - 1}.{_RESNET.get(m[2], m[2])}.{m[3]}"
    head, _, leaf = rest.partition(".")
    return f"{part}.{_TOP.get(head, head)}.{leaf}"


def _is_attention_weight(compvis_key: str) -> bool:
    return bool(re.search(r"(mid\.attn_1|\.attn\.\d+)\.(q|k|v|proj_out)\.weight$", compvis_key))


def compvis_to_diffusers_vae(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CompVis AutoencoderKL / VQModel state dict (`loss.*` dropped) -> diffusers AutoencoderKL / VQModel."""
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    levels = _num_levels(sd)
    out = {}
    for k, v in sd.items():
        out[compvis_vae_key(k, levels)] = v[:, :, 0, 0] if _is_attention_weight(k) else v
    return out


def diffusers_to_compvis_vae(sd: Mapping[str, torch.Tensor], compvis_keys) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL / VQModel state dict -> CompVis keys (`compvis_keys`: the target model's keys)."""
    keys = [k for k in compvis_keys if not k.startswith("loss.")]
    levels = _num_levels(keys)
    names = {compvis_vae_key(k, levels): k for k in keys}
    unknown = sorted(set(sd) - set(names))
    if unknown:
        raise KeyError(f"diffusers VAE keys with no CompVis counterpart in this model: {unknown[:5]}")
    out = {}
    for dk, v in sd.items():
        k = names[dk]
        out[k] = v[:, :, None, None] if _is_attention_weight(k) else v
    return out


def diffusers_autoencoder_config(dd: Mapping, n_embed: Optional[int] = None, embed_dim: Optional[int] = None,
                                 scale_factor: float = 1.0) -> dict:
    """diffusers AutoencoderKL (or VQModel with `n_embed`) config of a CompVis ddconfig; levels whose resolution is in
    `attn_resolutions` get attention blocks."""
    levels = len(dd["ch_mult"])
    res = [dd["resolution"] // 2 ** i for i in range(levels)]
    attn = [r in list(dd.get("attn_resolutions", [])) for r in res]
    cfg = {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "latent_channels": dd["z_channels"],
           "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]], "layers_per_block": dd["num_res_blocks"],
           "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
           "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
           "norm_num_groups": 32, "sample_size": dd["resolution"], "scaling_factor": float(scale_factor)}
    if n_embed is not None:
        cfg |= {"num_vq_embeddings": int(n_embed), "vq_embed_dim": int(embed_dim or dd["z_channels"])}
    return cfg


def save_diffusers_autoencoder(model, model_config, folder) -> Path:
    """A first stage (AutoencoderKL, VQModel / VQModelInterface) as a diffusers AutoencoderKL / VQModel folder:
    config.json and diffusion_pytorch_model.safetensors. `model_config`: the model's `params` mapping."""
    import json

    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    p = OmegaConf.to_container(model_config, resolve=True) if OmegaConf.is_config(model_config) else dict(model_config)
    vq = "n_embed" in p
    config = {"_class_name": "VQModel" if vq else "AutoencoderKL"} | diffusers_autoencoder_config(
        p["ddconfig"], n_embed=p.get("n_embed"), embed_dim=p.get("embed_dim"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = compvis_to_diffusers_vae(model.state_dict())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder
