"""Conditioning as a list of embedders (the shape of sgm's `GeneralConditioner`, Podell et al. 2023 for SDXL).

Each embedder owns its batch key(s), whether it trains, its drop rate for classifier-free guidance training and
its null value, and says what it feeds: the cross-attention context (concatenated on the feature axis), the
UNet's vector input `y` (concatenated, into the label / ADM embedding) or channels concatenated to the noisy
latent. What an output feeds is declared (`feeds`) or read from its rank, as sgm does (2: vector, 3: context,
4 or 5: concat).

Two forms build it: sgm's `conditioner_config` (`emb_models`: the conditioner owns its embedders, whose
parameters are `conditioner.embedders.N.*` as in sgm's checkpoints) and the CompVis keys (`cond_stage_config`,
`cond_stage_key`, `conditioning_key`): the conditioner borrows `cond_stage_model`, whose parameters keep their
CompVis names.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ldm.config_keys import unknown_keys_message
from ldm.modules.diffusionmodules.batch_random import GlobalBatchRandom
from ldm.modules.model_inputs import ConditionInput


class Feed(str, Enum):
    """Where an embedder's output goes in the UNet."""
    CROSSATTN = "crossattn"  # cross-attention context (B, T, D), concatenated on D
    VECTOR = "vector"        # the UNet's `y` (B, D), concatenated on D (SDXL's pooled text + size embeddings)
    CONCAT = "concat"        # channels concatenated to the noisy latent (B, C, H, W)

    @classmethod
    def of_output(cls, out: torch.Tensor) -> "Feed":
        """sgm's rule: an output's rank says what it feeds."""
        by_rank = {2: cls.VECTOR, 3: cls.CROSSATTN, 4: cls.CONCAT, 5: cls.CONCAT}
        if out.dim() not in by_rank:
            raise ValueError(f"an embedder output of shape {tuple(out.shape)} feeds nothing: expected rank 2 "
                             f"(vector), 3 (cross-attention) or 4-5 (concat), or declare `feeds`")
        return by_rank[out.dim()]

    @property
    def cat_dim(self) -> int:
        """The axis several embedders' outputs are concatenated on."""
        return 2 if self is Feed.CROSSATTN else 1

    @property
    def unet_key(self) -> str:
        """The keyword of `DiffusionWrapper.forward` that takes this feed."""
        return {Feed.CROSSATTN: "c_crossattn", Feed.VECTOR: "c_adm", Feed.CONCAT: "c_concat"}[self]

    @property
    def listed(self) -> bool:
        """Whether the wrapper takes it as a list of tensors (CompVis' c_concat / c_crossattn) or one tensor."""
        return self is not Feed.VECTOR


class Null(str, Enum):
    """How an embedder's condition is nulled (dropped in training, the unconditional branch of guidance)."""
    ZEROS = "zeros"            # the embedding set to zero (sgm without legacy_ucg_value)
    NULL_INPUT = "null_input"  # the input's own null before embedding: empty prompts, the null class, zeros (CompVis)


@dataclass(frozen=True)
class EmbedderRole:
    """What one embedder reads, how it is dropped and nulled, and what it feeds.

    `null`: a `Null` mode, or a raw value given to the embedder in place of each dropped item (sgm's
    `legacy_ucg_value`, e.g. the empty prompt). `guided`: whether guidance's unconditional branch nulls it
    (text and class labels do; SDXL's size vectors do not). `reads`: which input of `conditioning()` fills its
    key when sampling.
    """
    input_keys: tuple[str, ...]
    trainable: bool = False
    ucg_rate: float = 0.0
    null: Any = Null.ZEROS
    feeds: Optional[tuple[Feed, ...]] = None
    reads: ConditionInput = ConditionInput.RAW
    guided: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.ucg_rate) <= 1.0:
            raise ValueError(f"embedder of {self.input_keys}: ucg_rate {self.ucg_rate} must lie in [0, 1]")
        if len(self.input_keys) != 1 and self.null is not Null.ZEROS:
            raise ValueError(f"embedder of {self.input_keys}: an embedder of several keys is nulled by zeros only")


# keys of one `emb_models` entry besides target / params: sgm's, then this framework's
ENTRY_KEYS = ("target", "params", "is_trainable", "ucg_rate", "input_key", "input_keys", "legacy_ucg_value",
              "feeds", "guided", "reads")


def null_input_like(c: Any, key: str, null_label: Optional[int] = None) -> Any:
    """The raw "no condition" of the kind of `c` (batch key `key`): empty strings, the null class, zeros."""
    if isinstance(c, (list, tuple)) and all(isinstance(s, str) for s in c):
        return [""] * len(c)
    if isinstance(c, torch.Tensor) and not torch.is_floating_point(c):
        if null_label is None:
            raise ValueError(f"cond_stage_key '{key}': the conditioner has no null class "
                             f"(set ucg_rate: 0 or use a ClassEmbedder with a null class)")
        return torch.full_like(c, int(null_label))
    if isinstance(c, torch.Tensor):
        return torch.zeros_like(c)
    raise TypeError(f"cannot form a null condition for '{key}' of type {type(c).__name__}")


def drop_conditions(c: Any, p: float, null: Any, rng: Optional[GlobalBatchRandom] = None) -> Any:
    """Each item of `c` replaced by its item of `null` with probability p (classifier-free guidance training); the
    draws from `rng` (the global batch's) when given."""
    if isinstance(c, torch.Tensor):  # drawn where `c` lives: a host-to-device copy would wait for the GPU
        drop = (rng.rand(len(c)).to(c.device) if rng is not None else torch.rand(len(c), device=c.device)) < p
        return torch.where(drop.view(-1, *([1] * (c.dim() - 1))), null, c)
    drop = (rng.rand_host(len(c)) if rng is not None else torch.rand(len(c))) < p  # host data, host draws
    return [nl if d else x for x, nl, d in zip(c, null, drop.tolist())]


def _legacy_null(value: Any, like: Any) -> Any:
    """A legacy null value repeated for each item of `like`."""
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like).clone()
    return [value] * len(like)


def _frozen_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """`train()` of a frozen embedder: it stays in eval mode."""
    return module


@dataclass
class _Entry:
    module: nn.Module
    role: EmbedderRole
    encode: Callable[..., Any]
    null_label: Optional[int] = None


class GeneralConditioner(nn.Module):
    """A list of embedders whose outputs are concatenated per feed into the UNet's conditioning inputs."""

    def __init__(self, emb_models: Sequence[Any] = (), key: str = "conditioner_config.params.emb_models"):
        super().__init__()
        self.embedders = nn.ModuleList()
        self.entries: list[_Entry] = []
        for i, entry in enumerate(emb_models):
            module, role = _embedder_from_config(entry, f"{key}[{i}]")
            self.add(module, role, own=True)

    def add(self, module: nn.Module, role: EmbedderRole, own: bool = True,
            encode: Optional[Callable[..., Any]] = None) -> None:
        """Append an embedder: owned (registered under `embedders`, frozen unless trainable) or borrowed (a module
        registered by its model under another name, as CompVis' `cond_stage_model`)."""
        if own:
            if not role.trainable:
                module.eval()
                module.train = _frozen_train.__get__(module)
                for p in module.parameters():
                    p.requires_grad_(False)
            self.embedders.append(module)
        self.entries.append(_Entry(module, role, encode or module,
                                   getattr(module, "null_label", None)))

    @property
    def roles(self) -> list[EmbedderRole]:
        return [e.role for e in self.entries]

    @property
    def condition_inputs(self) -> frozenset[ConditionInput]:
        """The inputs of `conditioning()` its embedders read when sampling."""
        return frozenset(e.role.reads for e in self.entries)

    @property
    def guided(self) -> bool:
        """Whether guidance has anything to null."""
        return any(e.role.guided for e in self.entries)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for e in self.entries if e.role.trainable for p in e.module.parameters()]

    def modules_owned(self) -> list[nn.Module]:
        return list(self.embedders)

    # -- embedding ------------------------------------------------------------------------------------
    def inputs_of(self, entry: _Entry, batch: Mapping[str, Any]) -> list[Any]:
        missing = [k for k in entry.role.input_keys if k not in batch]
        if missing:
            raise KeyError(f"batch has no key {', '.join(repr(k) for k in missing)} (input_key of the "
                           f"{type(entry.module).__name__} embedder); keys: {sorted(batch)}")
        return [batch[k] for k in entry.role.input_keys]

    def _null_raw(self, entry: _Entry, raw: Any) -> Any:
        if entry.role.null is Null.NULL_INPUT:
            return null_input_like(raw, entry.role.input_keys[0], entry.null_label)
        return _legacy_null(entry.role.null, raw)

    def embed_one(self, entry: _Entry, batch: Mapping[str, Any], *, drop: bool = False, null: bool = False,
                  rng: Optional[GlobalBatchRandom] = None) -> list[tuple[Feed, torch.Tensor]]:
        """One embedder's outputs with what each feeds; `drop`: items dropped at its ucg_rate (training);
        `null`: its null condition for every item (guidance's unconditional branch)."""
        role, raws = entry.role, self.inputs_of(entry, batch)
        p = float(role.ucg_rate) if drop else 0.0
        by_input = role.null is not Null.ZEROS
        if by_input and null:
            raws = [self._null_raw(entry, raws[0])]
        elif by_input and p > 0:
            raws = [drop_conditions(raws[0], p, self._null_raw(entry, raws[0]), rng)]
        with torch.set_grad_enabled(role.trainable and torch.is_grad_enabled()):
            out = entry.encode(*raws)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        feeds = role.feeds or tuple(Feed.of_output(o) for o in outs)
        if len(feeds) != len(outs):
            raise ValueError(f"the {type(entry.module).__name__} embedder of {role.input_keys} returned {len(outs)} "
                             f"outputs for {len(feeds)} declared feeds {[f.value for f in feeds]}")
        if not by_input and null:
            outs = [torch.zeros_like(o) for o in outs]
        elif not by_input and p > 0:  # one draw per item for all of the embedder's outputs (sgm: bernoulli * emb)
            n = outs[0].shape[0]
            keep = ((rng.rand(n) if rng is not None else torch.rand(n)).to(outs[0].device) >= p)
            outs = [o * keep.view(-1, *([1] * (o.dim() - 1))).to(o.dtype) for o in outs]
        return list(zip(feeds, outs))

    @staticmethod
    def routed(parts: Sequence[tuple[Feed, torch.Tensor]]) -> dict[str, Any]:
        """The UNet's conditioning keywords: each feed's outputs concatenated in embedder order."""
        out: dict[str, Any] = {}
        for feed in Feed:
            mine = [t for f, t in parts if f is feed]
            if mine:
                joined = torch.cat(mine, feed.cat_dim) if len(mine) > 1 else mine[0]
                out[feed.unet_key] = [joined] if feed.listed else joined
        return out

    def forward(self, batch: Mapping[str, Any], *, drop: bool = False,
                rng: Optional[GlobalBatchRandom] = None) -> dict[str, Any]:
        """The conditioning of `batch`: {"c_crossattn": [context], "c_adm": vector, "c_concat": [channels]}."""
        return self.routed([p for e in self.entries for p in self.embed_one(e, batch, drop=drop, rng=rng)])

    def with_unconditional(self, batch: Mapping[str, Any], guidance: bool = True) -> tuple[dict, Optional[dict]]:
        """(the conditioning, its unconditional twin when guiding and anything is guided, else None): the guided
        embedders nulled, the others computed once and shared."""
        per = [self.embed_one(e, batch) for e in self.entries]
        cond = self.routed([p for parts in per for p in parts])
        if not (guidance and self.guided):
            return cond, None
        null = [parts if not e.role.guided
                else [(f, torch.zeros_like(t)) for f, t in parts] if e.role.null is Null.ZEROS  # no second encoding
                else self.embed_one(e, batch, null=True) for e, parts in zip(self.entries, per)]
        return cond, self.routed([p for parts in null for p in parts])


def _as_feeds(value: Any, where: str) -> Optional[tuple[Feed, ...]]:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    try:
        return tuple(Feed(v) for v in items)
    except ValueError:
        raise ValueError(f"{where}.feeds: {items} must be among {[f.value for f in Feed]}") from None


def _embedder_from_config(entry: Any, where: str) -> tuple[nn.Module, EmbedderRole]:
    """One sgm `emb_models` entry: the embedder and its role; unknown keys refused with the closest name."""
    from ldm.util import ConfigError, instantiate_from_config

    if not isinstance(entry, Mapping) and not hasattr(entry, "keys"):
        raise ConfigError(f"{where}: expected a mapping with `target:`, got {entry!r}")
    unknown = [k for k in entry.keys() if k not in ENTRY_KEYS]
    if unknown:
        raise ConfigError(unknown_keys_message(where, unknown, ENTRY_KEYS))
    if ("input_key" in entry) == ("input_keys" in entry):
        raise ConfigError(f"{where}: give exactly one of input_key, input_keys")
    keys = (entry["input_key"],) if "input_key" in entry else tuple(entry["input_keys"])
    module = instantiate_from_config({"target": entry["target"], "params": entry.get("params") or {}},
                                     key=where)
    reads = ConditionInput(entry["reads"]) if entry.get("reads") is not None else \
        getattr(module, "condition_input", ConditionInput.RAW)
    guided = entry.get("guided")
    guided = (reads in (ConditionInput.PROMPTS, ConditionInput.LABELS)) if guided is None else bool(guided)
    null: Any = Null.ZEROS if entry.get("legacy_ucg_value") is None else entry["legacy_ucg_value"]
    try:
        role = EmbedderRole(input_keys=keys, trainable=bool(entry.get("is_trainable", False)),
                            ucg_rate=float(entry.get("ucg_rate", 0.0)), null=null,
                            feeds=_as_feeds(entry.get("feeds"), where), reads=reads, guided=guided)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e
    return module, role
