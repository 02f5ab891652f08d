"""Stable Diffusion v1 / v2 layouts <-> a diffusers `StableDiffusionPipeline` (or, for the 9-channel inpainting
UNet, `StableDiffusionInpaintPipeline`) folder, both ways.

`to_diffusers_pipeline(model, config, folder)` writes unet/, vae/, text_encoder/ (CLIPTextModel: SD v1's CLIP, or
SD v2's OpenCLIP tower converted, ldm.convert.openclip_text), tokenizer/ (the CLIP BPE vocabulary that ships with
open_clip, as CLIPTokenizer files), scheduler/ (DDIMScheduler with the model's beta schedule and prediction type,
CompVis' DDIM timesteps) and model_index.json, each with its config; no safety checker.
`from_diffusers_pipeline(folder, model, config)` reads such a folder back into our state-dict layout.
diffusers is imported only here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ldm.errors import InputError
from ldm.convert.diffusers_unet import compvis_to_diffusers_unet, diffusers_to_compvis_unet
from ldm.convert.diffusers_vae import compvis_to_diffusers_vae, diffusers_autoencoder_config, diffusers_to_compvis_vae

logger = logging.getLogger(__name__)

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
OPENCLIP_UNUSED = "openclip_unused.safetensors"  # the parts of the tower SD2 does not read, kept for the way back
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _params(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """`model.params` of a whole config, or `params` of a model section, as plain containers."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    return (cfg["model"] if "model" in cfg else cfg)["params"]


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def unet_layout(u: Mapping[str, Any]) -> dict[str, Any]:
    """What the renaming needs from a UNetModel's params: levels, levels with attention, res blocks per level."""
    levels = len(u["channel_mult"])
    nrb = u["num_res_blocks"]
    if not isinstance(nrb, int):
        if len(set(nrb)) != 1:
            raise InputError("diffusers' UNet2DConditionModel needs the same num_res_blocks on every level")
        nrb = nrb[0]
    attention = [i for i in range(levels) if 2 ** i in list(u["attention_resolutions"])]
    return {"levels": levels, "attention_levels": attention, "num_res_blocks": nrb}


def unet_config(u: Mapping[str, Any], sample_size: int) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config of an SD-layout UNetModel's params."""
    lay = unet_layout(u)
    chans = [u["model_channels"] * m for m in u["channel_mult"]]
    nhc = u.get("num_head_channels", -1)
    heads = [c // nhc for c in chans] if nhc not in (-1, None) else u.get("num_heads")
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size, "in_channels": u["in_channels"],
        "out_channels": u["out_channels"], "block_out_channels": chans, "layers_per_block": lay["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if i in lay["attention_levels"] else "DownBlock2D"
                             for i in range(lay["levels"])],
        "up_block_types": ["CrossAttnUpBlock2D" if i in lay["attention_levels"] else "UpBlock2D"
                           for i in reversed(range(lay["levels"]))],
        "cross_attention_dim": u["context_dim"], "attention_head_dim": heads,
        "use_linear_projection": bool(u.get("use_linear_in_transformer", False)), "norm_num_groups": 32,
    } | _unet_extras(u)


def _unet_extras(u: Mapping[str, Any]) -> dict[str, Any]:
    """Class embedding (the x4 upscaler's noise level) and per-level cross-attention-only transformers."""
    extras: dict[str, Any] = {}
    if isinstance(u.get("num_classes"), int):
        extras["num_class_embeds"] = u["num_classes"]
    if u.get("disable_self_attentions") is not None:
        extras["only_cross_attention"] = [bool(v) for v in u["disable_self_attentions"]]
    if u.get("disable_middle_self_attn"):
        raise InputError("disable_middle_self_attn has no diffusers UNet2DConditionModel equivalent")
    return extras


def vae_config(dd: Mapping[str, Any], scale_factor: float) -> dict[str, Any]:
    """diffusers AutoencoderKL config of a KL autoencoder's ddconfig."""
    return {"_class_name": "AutoencoderKL"} | diffusers_autoencoder_config(dd, scale_factor=scale_factor)


def scheduler_config(p: Mapping[str, Any]) -> dict[str, Any]:
    """DDIMScheduler settings reproducing CompVis' DDIM (timesteps t = k * T / steps + 1; final alpha = alpha_0).
    CompVis' `linear` schedule (linear in sqrt(beta)) is diffusers' `scaled_linear`."""
    if p.get("beta_schedule", "linear") != "linear" or p.get("given_betas") is not None:
        raise InputError("only CompVis' default `linear` beta schedule has a diffusers name (scaled_linear)")
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": int(p.get("timesteps", 1000)),
            "beta_start": float(p.get("linear_start", 1e-4)), "beta_end": float(p.get("linear_end", 2e-2)),
            "beta_schedule": "scaled_linear", "prediction_type": PREDICTION[p.get("parameterization", "eps")],
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def write_clip_tokenizer(folder: Path, max_length: int = 77, pad_token: str = "<|endoftext|>") -> None:
    """CLIPTokenizer files (vocab.json, merges.txt) from the BPE vocabulary shipped with open_clip."""
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(t, t): i for t, i in tok.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
        "do_lower_case": True}))


def _write(folder: Path, config: dict, tensors: dict, weights: str) -> None:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / weights))


def to_diffusers_pipeline(model, config: Mapping[str, Any], folder: Union[str, Path], use_ema: bool = True) -> Path:
    """Write an SD-v1-layout LatentDiffusion (CLIP text encoder) as a StableDiffusionPipeline folder; `config` is
    the model's config (its `model:` section or the whole file)."""
    import diffusers
    from ldm.models.diffusion.superres import LatentUpscaleDiffusion
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
    folder = Path(folder)
    encoder = model.cond_stage_model
    v1 = isinstance(encoder, FrozenCLIPEmbedder) and encoder.layer == "last"
    if not (v1 or isinstance(encoder, FrozenOpenCLIPEmbedder)):
        raise InputError("to_diffusers_pipeline: needs the SD v1 (FrozenCLIPEmbedder, layer 'last') or SD v2 "
                         f"(FrozenOpenCLIPEmbedder) layout; got {type(model).__name__} with {type(encoder).__name__}")
    upscaler = isinstance(model, LatentUpscaleDiffusion)
    with (model.ema_scope("export") if use_ema else torch.no_grad()):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    p = _params(config)
    u = p["unet_config"]["params"]
    lay = unet_layout(u)
    unet_sd = compvis_to_diffusers_unet(_sub(sd, UNET_PREFIX), lay["num_res_blocks"], lay["levels"],
                                        lay["attention_levels"])
    _write(folder / "unet", unet_config(u, model.image_size), unet_sd, "diffusion_pytorch_model.safetensors")
    _write(folder / "vae", vae_config(p["first_stage_config"]["params"]["ddconfig"], float(model.scale_factor)),
           compvis_to_diffusers_vae(_sub(sd, VAE_PREFIX)), "diffusion_pytorch_model.safetensors")
    if v1:
        _write_text_encoder(folder / "text_encoder", encoder, _sub(sd, TEXT_PREFIX))
    else:
        _write_openclip_text_encoder(folder / "text_encoder", encoder, _sub(sd, OPENCLIP_PREFIX))
    write_clip_tokenizer(folder / "tokenizer", encoder.tokenizer.max_length, "<|endoftext|>" if v1 else "!")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(p), indent=2))
    index: dict[str, Any] = {}
    if upscaler:  # the noise augmentation of the low-resolution input, as diffusers' low_res_scheduler
        low = p["low_scale_config"]["params"]
        noise = dict(low.get("noise_schedule_config") or {})
        (folder / "low_res_scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "low_res_scheduler" / "scheduler_config.json").write_text(json.dumps(
            scheduler_config(noise | {"timesteps": noise.get("timesteps", 1000)}) | {
                "_class_name": "DDPMScheduler", "prediction_type": "epsilon"}, indent=2))
        index = {"low_res_scheduler": ["diffusers", "DDPMScheduler"], "max_noise_level": int(low["max_noise_level"])}
    pipeline = ("StableDiffusionUpscalePipeline" if upscaler else
                "StableDiffusionInpaintPipeline" if u["in_channels"] == 9 else "StableDiffusionPipeline")
    (folder / "model_index.json").write_text(json.dumps(index | {
        "_class_name": pipeline, "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False},
        indent=2))
    logger.info("wrote a StableDiffusionPipeline folder to %s", folder)
    return folder


def _write_text_encoder(folder: Path, encoder, text_sd: dict) -> None:
    """transformers CLIPTextModel files, in the installed transformers' own key layout."""
    from safetensors.torch import save_file
    from transformers import PreTrainedModel
    folder.mkdir(parents=True, exist_ok=True)
    inner = encoder.transformer.text_model
    if isinstance(inner, PreTrainedModel):  # transformers >= 5: the CLIPTextModel itself
        inner.save_pretrained(folder, safe_serialization=True)
        return
    inner.config.save_pretrained(folder)  # transformers 4: the CLIPTextTransformer inside `text_model`
    save_file({f"text_model.{k}": v.contiguous() for k, v in text_sd.items()}, str(folder / "model.safetensors"))


def _write_openclip_text_encoder(folder: Path, encoder, openclip_sd: dict) -> None:
    """SD v2's OpenCLIP tower as a CLIPTextModel with the layers it reads (+ the rest for the way back)."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from ldm.convert.openclip_text import clip_text_config, openclip_to_clip_text
    layers_used = len(encoder.model.transformer.resblocks) - encoder.layer_idx
    text = CLIPTextModel(clip_text_config(encoder.model, layers_used, encoder.tokenizer.max_length))
    prefix = "text_model." if any(k.startswith("text_model.") for k in text.state_dict()) else ""
    mapped, unused = openclip_to_clip_text(openclip_sd, layers_used, prefix)
    text.load_state_dict(mapped, strict=True)
    text.save_pretrained(folder, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in unused.items()}, str(folder / OPENCLIP_UNUSED))


def from_diffusers_pipeline(folder: Union[str, Path], model, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of `model` (an SD-v1-layout LatentDiffusion built from `config`) read from a
    StableDiffusionPipeline folder."""
    from safetensors.torch import load_file
    folder = Path(folder)
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder}: no {part}/ folder (not a StableDiffusionPipeline folder?)")
    own = model.state_dict()
    lay = unet_layout(_params(config)["unet_config"]["params"])

    def weights(part: str) -> dict:
        files = sorted((folder / part).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder / part}: no .safetensors weights")
        return load_file(str(files[0]))

    unet_keys = [k[len(UNET_PREFIX):] for k in own if k.startswith(UNET_PREFIX)]
    vae_keys = [k[len(VAE_PREFIX):] for k in own if k.startswith(VAE_PREFIX)]
    out = {UNET_PREFIX + k: v for k, v in diffusers_to_compvis_unet(
        weights("unet"), unet_keys, lay["num_res_blocks"], lay["levels"], lay["attention_levels"]).items()}
    out |= {VAE_PREFIX + k: v for k, v in diffusers_to_compvis_vae(weights("vae"), vae_keys).items()}
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    text = load_file(str(folder / "text_encoder" / "model.safetensors"))
    if isinstance(model.cond_stage_model, FrozenOpenCLIPEmbedder):
        from ldm.convert.openclip_text import clip_text_to_openclip
        extra = folder / "text_encoder" / OPENCLIP_UNUSED
        unused = load_file(str(extra)) if extra.is_file() else {}
        out |= {OPENCLIP_PREFIX + k: v for k, v in clip_text_to_openclip(text, unused).items()}
    else:
        out |= {TEXT_PREFIX + (k[len("text_model."):] if k.startswith("text_model.") else k): v  # 4.x or 5.x keys
                for k, v in text.items() if not k.endswith("position_ids")}
    for k, v in own.items():  # the noise-schedule buffers are the config's
        if k not in out and not k.startswith(("model.", "model_ema.", "first_stage_model.", "cond_stage_model.")):
            out[k] = v
    return out  # no model_ema.*: loading starts the EMA from these weights
