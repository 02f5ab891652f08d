"""Samples for evaluation: class-balanced or caption-drawn conditions, and per-image seeds.

Image k of an evaluation is drawn from its own generator seeded with `seed + k` (start code and any sampler
noise), so a rerun, a resumed run or another batch size gives the same image k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from ldm import generation
from ldm.errors import InputError
from ldm.eval.images import to_uint8_rgb
from ldm.generation import generators, image_seeds, reads, sampling_scope
from ldm.modules.model_inputs import ConditionInput


@dataclass
class Conditions:
    """What each of the N samples is conditioned on: class labels, prompts, or nothing."""
    kind: str  # "class", "text" or "none"
    values: Optional[list]

    def batch(self, start: int, stop: int) -> Optional[list]:
        return None if self.values is None else self.values[start:stop]


def model_condition_kind(model) -> str:
    """"class" for a class-label conditioner, "text" for one that reads strings, "none" for unconditional."""
    if not getattr(model, "condition_inputs", None):
        return "none"
    if reads(model, ConditionInput.LABELS):
        return "class"
    if reads(model, ConditionInput.PROMPTS):
        return "text"
    raise InputError(f"evaluation samples class-conditional, text-conditional or unconditional models; this one is "
                     f"conditioned on '{model.cond_stage_key}' ({type(model.cond_stage_model).__name__})")


def conditions_for(model, n: int, *, reference=None, prompts: Optional[Sequence[str]] = None) -> Conditions:
    """Class-balanced labels (k mod n_classes), prompts (given, else the captions of a seeded random subset of the
    reference items, cycled) or none."""
    kind = model_condition_kind(model)
    if kind == "class":
        n_classes = int(model.cond_stage_model.n_classes)
        return Conditions("class", [k % n_classes for k in range(n)])
    if kind == "text":
        if prompts is None:
            if reference is None:
                raise InputError("a text-conditional model needs prompts (--from_file) or a reference dataset with captions")
            from ldm.eval.reference import SUBSET_SEED, subset_indices
            prompts = [reference[k]["caption"] for k in subset_indices(len(reference), n, SUBSET_SEED)]
        prompts = list(prompts)
        if not prompts:
            raise InputError("no prompts to sample from")
        return Conditions("text", [prompts[k % len(prompts)] for k in range(n)])
    return Conditions("none", None)


@torch.no_grad()
def generate(model, n: int, conditions: Conditions, *, sampler: str, steps: int, scale: float, seed: int,
             batch_size: int, start: int = 0, use_ema: bool = True,
             sampler_options: Optional[dict[str, Any]] = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Samples start..n-1 as uint8 (B, 3, H, W) batches, yielded with their first index; image k uses seed + k."""
    with sampling_scope(model, use_ema, context="evaluation"):
        for first in range(start, n, batch_size):
            last = min(first + batch_size, n)
            bs = last - first
            g = generators(image_seeds(seed, first, bs), model.device)
            raw = conditions.batch(first, last)
            cond = model.conditioning(prompts=raw if conditions.kind == "text" else None,
                                      labels=raw if conditions.kind == "class" else None,
                                      guidance=generation.needs_unconditional(model, scale))
            images = generation.generate(model, cond, bs, steps=steps, sampler=sampler, scale=scale, generator=g,
                                         **(sampler_options or {}))
            yield first, to_uint8_rgb(images)
