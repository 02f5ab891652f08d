"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the UNet, through peft.

An adapter adds B A (rank r, scaled by alpha / r) to a linear layer's weight: by default the attention
projections (to_q, to_k, to_v, to_out.0), optionally the feed-forward. peft injects and trains the
layers; this module names what to adapt, takes the adapter weights out and puts them back, and merges
adapters into the base weights with a scale (several at once, each with its own). The file layouts
users share (diffusers', kohya's) are in ldm.convert.lora.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.errors import InputError

logger = logging.getLogger(__name__)

# the attention projections of ldm.modules.attention.CrossAttention, and the feed-forward of its transformer block
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
DEFAULT_ADAPTER = "default"
UNET_PREFIX = "model.diffusion_model."
LORA_A, LORA_B = "lora_A", "lora_B"


@dataclass
class LoraSettings:
    """Rank, alpha (default: the rank, i.e. scale 1), dropout and the layers to adapt (names or name suffixes)."""
    rank: int = 4
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: Sequence[str] = ATTENTION_TARGETS
    feed_forward: bool = False

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise InputError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InputError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        self.alpha = float(self.rank if self.alpha is None else self.alpha)
        self.target_modules = tuple(self.target_modules) + (FEED_FORWARD_TARGETS if self.feed_forward else ())

    @classmethod
    def from_config(cls, config: Mapping, key: str = "model.params.lora_config") -> "LoraSettings":
        """The settings of a config mapping; a key that is not a field is refused with the closest field's name."""
        from dataclasses import fields

        from ldm.config_keys import unknown_keys_message
        names = [f.name for f in fields(cls)]
        unknown = [k for k in config if k not in names]
        if unknown:
            raise InputError(unknown_keys_message(key, unknown, names))
        return cls(**dict(config.items()))

    @property
    def scaling(self) -> float:
        """alpha / rank: the factor of B A in the adapted weight."""
        return self.alpha / self.rank

    def peft_config(self):
        """The peft LoraConfig of these settings."""
        from peft import LoraConfig

        return LoraConfig(r=int(self.rank), lora_alpha=self.alpha, lora_dropout=float(self.dropout),
                          target_modules=list(self.target_modules), bias="none")


def add_lora(module: nn.Module, settings: LoraSettings, name: str = DEFAULT_ADAPTER) -> list[str]:
    """Inject adapter `name` into `module` (e.g. the UNet) with peft: B starts at zero, so the output is unchanged.
    Returns the adapted layers' names; an error when none matches the targets."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(settings.peft_config(), module, adapter_name=name)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise InputError(f"LoRA target_modules {list(settings.target_modules)}: {e}") from None
    return adapted_layers(module, name)


def adapted_layers(module: nn.Module, name: str = DEFAULT_ADAPTER) -> list[str]:
    """Names of the layers of `module` carrying adapter `name`."""
    from peft.tuners.lora import LoraLayer

    return [n for n, m in module.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A]


def lora_state_dict(module: nn.Module, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights only: {"<layer>.lora_A.weight": (r, in), "<layer>.lora_B.weight": (out, r)}."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(module, adapter_name=name).items()}


def load_lora_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], name: str = DEFAULT_ADAPTER) -> None:
    """Set adapter `name`'s weights from `lora_state_dict`'s layout; every adapted layer must be given, nothing else."""
    from peft import set_peft_model_state_dict

    expected = set(lora_state_dict(module, name))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise InputError(f"LoRA weights do not fit adapter '{name}': missing {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{' ...' if len(unexpected) > 3 else ''}")
    set_peft_model_state_dict(module, dict(sd), adapter_name=name)


@dataclass
class Adapter:
    """Adapter weights by layer: {layer name: (A (r, in), B (out, r))}, B A times `scaling` being the weight delta."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scaling: float = 1.0

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], scaling: float = 1.0) -> "Adapter":
        """From `lora_state_dict`'s layout ("<layer>.lora_A.weight" / "<layer>.lora_B.weight")."""
        pairs = {}
        for key in sd:
            if key.endswith(f".{LORA_A}.weight"):
                layer = key[: -len(f".{LORA_A}.weight")]
                b = sd.get(f"{layer}.{LORA_B}.weight")
                if b is None:
                    raise InputError(f"LoRA weights: {key} has no {LORA_B} partner")
                pairs[layer] = (sd[key], b)
        if 2 * len(pairs) != len(sd):
            raise InputError(f"LoRA weights: {len(sd) - 2 * len(pairs)} entries are neither lora_A nor lora_B")
        return cls(pairs, scaling)

    def delta(self, layer: str) -> torch.Tensor:
        """The weight change of `layer`: scaling * B A (float32)."""
        a, b = self.pairs[layer]
        return self.scaling * (b.float() @ a.float())

    def rank(self) -> int:
        return max(int(a.shape[0]) for a, _ in self.pairs.values())


def merge_into_state_dict(sd: Mapping[str, torch.Tensor], adapters: Iterable[tuple[Adapter, float]],
                          prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """A copy of `sd` with each (adapter, scale) merged: W <- W + scale * scaling * B A for its layers
    (`prefix` + layer + ".weight"); a layer the state dict lacks, or of another shape, is an error."""
    out = dict(sd)
    for adapter, scale in adapters:
        for layer in adapter.pairs:
            key = f"{prefix}{layer}.weight"
            if key not in out:
                raise InputError(f"LoRA layer {layer}: the model has no weight {key}")
            d = adapter.delta(layer)
            if d.shape != out[key].shape:
                raise InputError(f"LoRA layer {layer}: delta {tuple(d.shape)} does not fit {key} "
                                 f"{tuple(out[key].shape)}")
            out[key] = (out[key].float() + float(scale) * d.to(out[key].device)).to(out[key].dtype)
    return out


@torch.no_grad()
def merge_into_model(model, adapters: Iterable[tuple[Adapter, float]]) -> int:
    """Merge (adapter, scale) pairs into a LatentDiffusion's UNet weights, and into its EMA weights when it keeps
    them (sampling uses those). Returns the number of layers changed."""
    params = dict(model.model.diffusion_model.named_parameters())
    ema = getattr(model, "model_ema", None) if getattr(model, "use_ema", False) else None
    ema_buffers = dict(ema.named_buffers()) if ema is not None else {}
    changed = 0
    for adapter, scale in adapters:
        for layer in adapter.pairs:
            weight = params.get(f"{layer}.weight")
            if weight is None:
                raise InputError(f"LoRA layer {layer}: this model's UNet has no such linear layer")
            d = float(scale) * adapter.delta(layer).to(weight.device)
            if d.shape != weight.shape:
                raise InputError(f"LoRA layer {layer}: delta {tuple(d.shape)} does not fit the weight "
                                 f"{tuple(weight.shape)}")
            weight.copy_((weight.float() + d).to(weight.dtype))
            if ema is not None:
                shadow = ema_buffers.get(ema.m_name2s_name.get(f"diffusion_model.{layer}.weight", ""))
                if shadow is not None:
                    shadow.copy_((shadow.float() + d.to(shadow.device)).to(shadow.dtype))
            changed += 1
    return changed


class LoraFineTuning:
    """LoRA fine-tuning of a diffusion model's UNet (config `model.params.lora_config`): the adapters are added once
    the base weights (`ckpt_path`; its EMA weights when it has them) are loaded, only they train (and only they
    have EMA weights), a run's
    checkpoints hold the adapters and the base's path and hash instead of the base, and a run refuses a base
    whose hash differs."""

    def __init__(self, settings: LoraSettings):
        self.settings = settings
        self.base: Optional[dict] = None  # {"path", "sha256"} once applied

    @property
    def applied(self) -> bool:
        return self.base is not None

    def apply(self, model, base_path: str) -> None:
        """Add the adapters to `model`'s UNet on top of the weights just loaded from `base_path`; freeze the rest."""
        from ldm.files import file_hash
        from ldm.modules.ema import LitEma

        if model.use_ema:  # the base is what sampling it uses: its EMA weights (its weights when it has none)
            model.model_ema.copy_to(model.model)
        layers = add_lora(model.model.diffusion_model, self.settings)
        for name, p in model.model.named_parameters():
            p.requires_grad_(".lora_" in name)
        if model.use_ema:  # from here the EMA follows what trains: the adapters
            model.model_ema = LitEma(model.model, decay=float(model.model_ema.decay))
        self.base = {"path": str(base_path), "sha256": file_hash(base_path, n=64)}
        model.strict_loading = False  # Lightning's resume: a run checkpoint lacks the base weights (checked here)
        n = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
        logger.info("LoRA rank %d on %d UNet layers: %d trainable parameters; base %s", self.settings.rank,
                    len(layers), n, base_path)

    def frozen_keys(self, model) -> set[str]:
        """State-dict keys of the frozen parameters: what the base checkpoint supplies."""
        return {name for name, p in model.named_parameters() if not p.requires_grad}

    def prune(self, model, checkpoint: dict) -> None:
        """A run checkpoint without the frozen base weights, naming the base (path, sha256) and the settings."""
        sd = checkpoint.get("state_dict", {})
        for key in self.frozen_keys(model):
            sd.pop(key, None)
        checkpoint["lora_base"] = dict(self.base)
        checkpoint["lora_settings"] = {"rank": self.settings.rank, "alpha": self.settings.alpha,
                                       "target_modules": list(self.settings.target_modules)}

    def missing_after_base(self, model, ckpt: Mapping, missing: Sequence[str], source: str) -> list[str]:
        """The keys still missing once the base supplies the frozen ones; an error when `ckpt` names another base."""
        base = ckpt.get("lora_base") if isinstance(ckpt, Mapping) else None
        if base is None:  # a full checkpoint: every key must be in it
            return list(missing)
        if base.get("sha256") != self.base["sha256"]:
            from ldm.checkpoint import CheckpointError

            raise CheckpointError(f"{source} holds LoRA adapters trained on the base {base.get('path')} (sha256 "
                                  f"{str(base.get('sha256'))[:12]}...), but this config's ckpt_path "
                                  f"{self.base['path']} has sha256 {self.base['sha256'][:12]}...: give the run's base")
        frozen = self.frozen_keys(model)
        return [k for k in missing if k not in frozen]
