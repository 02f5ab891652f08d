"""Config keys checked against what a target takes: typos refused with the closest valid name, and the one list of
CompVis keys that are accepted for compatibility but have no effect here (each logged once when given)."""
from __future__ import annotations

import difflib
import inspect
import logging
from typing import Any, Iterable, Mapping, Optional

logger = logging.getLogger(__name__)

# Packages whose constructors pass **kwargs only on to their bases: a key that no constructor of the chain names is
# a typo. A chain that reaches a class of another package (torch, Lightning, transformers) is not judged.
FRAMEWORK_PACKAGES = ("ldm", "main", "sgm")

# Keys of users' published configs that are accepted and do nothing here, by the class that takes them: why.
NO_EFFECT_KEYS: dict[str, dict[str, str]] = {
    "UNetModel": {
        "use_fp16": "choose the precision at run time (trainer precision, or --precision for sampling)",
    },
    "VideoUNet": {
        "spatial_transformer_attn_type": "attention runs on torch's SDPA (memory-efficient on CUDA) or the CPU kernel",
    },
    "DDPM": {
        "log_every_t": "CompVis' intermediate-sample logging interval; log_images here logs fixed rows",
        "use_positional_encodings": "CompVis stored it and never read it",
    },
}


def closest_name(name: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate nearest to `name` by difflib's ratio (at least 0.6), else None."""
    found = difflib.get_close_matches(str(name), sorted(set(candidates)), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_keys_message(where: str, unknown: Iterable[str], accepted: Iterable[str]) -> str:
    """`where: unknown key 'x' (did you mean 'y'?)...; accepted: ...` for keys nobody reads."""
    accepted = sorted(set(accepted))
    parts = []
    for key in sorted(unknown):
        near = closest_name(key, accepted)
        parts.append(f"'{key}'" + (f" (did you mean '{near}'?)" if near else ""))
    plural = "s" if len(parts) > 1 else ""
    return f"{where}: unknown key{plural} {', '.join(parts)}; Accepted: {', '.join(accepted)}"


def _is_framework(klass: type) -> bool:
    return klass.__module__.split(".")[0] in FRAMEWORK_PACKAGES


def accepted_keys(obj: Any) -> Optional[set[str]]:
    """The keyword names a framework class's constructor chain takes (its __init__, and its bases' while each takes
    **kwargs), or None where the chain stays open (a function with **kwargs, a base of another package)."""
    if not inspect.isclass(obj) or not _is_framework(obj):
        return None
    names: set[str] = set()
    for klass in obj.__mro__:
        if "__init__" not in vars(klass):
            continue
        if not _is_framework(klass):
            return None
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items()
                  if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names
    return None


def unknown_keys(obj: Any, params: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    """(the keys of `params` that `obj`'s constructor chain does not take, the names it does take)."""
    accepted = accepted_keys(obj)
    if accepted is None:
        return [], set()
    return sorted(k for k in params if k not in accepted), accepted


_reported: set[str] = set()


def report_once(message: str, *args: Any) -> None:
    """Log `message` at INFO the first time it is seen in this process (parameters accepted but meaningless here,
    substituted targets)."""
    text = message % args if args else message
    if text not in _reported:
        _reported.add(text)
        logger.info(text)


def report_no_effect(owner: str, given: Iterable[str]) -> None:
    """Log once each key of `given` that `owner` accepts for compatibility only (NO_EFFECT_KEYS)."""
    for key in sorted(given):
        why = NO_EFFECT_KEYS.get(owner, {}).get(key)
        if why is not None:
            report_once("%s: config key '%s' is accepted for compatibility and has no effect here (%s)", owner, key, why)
