"""Opt-in `torch.compile` of the UNet and of the first stage's decoder, for training and sampling.

Compilation is in place (`nn.Module.compile`): the modules keep their state-dict keys (no `_orig_mod.` prefix), so
checkpoints of a compiled run load anywhere, and the EMA swap and LoRA adapters act on the same parameters. It is
lazy: the first forward pass at a new shape (or grad mode) compiles, later ones reuse the graph.

    model.params.compile: true                                   # the UNet, torch's default mode
    model.params.compile: {mode: max-autotune-no-cudagraphs, decoder: true}
    python scripts/txt2img.py ... --compile [MODE]              # the sampling scripts: the UNet and the decoder
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ldm.config_keys import closest_name
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

# torch.compile's modes ("reduce-overhead" records CUDA graphs: for small models on a GPU, whose steps are bound by
# kernel launches; on the CPU it is the default mode).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileSettings:
    """What to compile and how (torch.compile's `mode`, `dynamic`, `fullgraph`, `backend`)."""
    unet: bool = True
    decoder: bool = False
    mode: str = "default"
    dynamic: Optional[bool] = None
    fullgraph: bool = False
    backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"compile mode '{self.mode}' is not one of {list(MODES)}")

    @classmethod
    def parse(cls, value: Any, key: str = "model.params.compile") -> Optional["CompileSettings"]:
        """None / false: off; true: the UNet in the default mode; a mode name; or a mapping of the fields."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, str):
            return cls(mode=value)
        if isinstance(value, Mapping) or hasattr(value, "items"):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - fields)
            if unknown:
                hints = [f"'{k}': did you mean '{near}'?" for k in unknown if (near := closest_name(k, fields))]
                raise ConfigError(f"{key}: unknown key(s) {unknown}; known: {sorted(fields)}"
                                  + (f" ({'; '.join(hints)})" if hints else ""))
            return cls(**dict(value.items()))
        raise ConfigError(f"{key}: expected true/false, a mode name or a mapping, got {value!r}")

    def options(self) -> dict:
        """The keyword arguments of torch.compile."""
        mode = None if self.mode == "default" else self.mode
        return {"mode": mode, "dynamic": self.dynamic, "fullgraph": self.fullgraph, "backend": self.backend}


def compile_networks(model: nn.Module, settings: CompileSettings) -> list[str]:
    """Compile, in place, the diffusion model's UNet and (when asked) its first stage's decoder; the names compiled.

    Idempotent: a module compiled before is left as it is."""
    targets: list[tuple[str, Optional[nn.Module]]] = []
    if settings.unet:
        wrapper = getattr(model, "model", None)
        targets.append(("model.diffusion_model", getattr(wrapper, "diffusion_model", None)))
    if settings.decoder:
        first_stage = getattr(model, "first_stage_model", None)
        targets.append(("first_stage_model.decoder", getattr(first_stage, "decoder", None)))
    done = []
    for name, module in targets:
        if module is None:
            raise ConfigError(f"compile: {type(model).__name__} has no {name} to compile")
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(**settings.options())
        done.append(name)
    logger.info("torch.compile (%s mode, backend %s): %s", settings.mode, settings.backend, ", ".join(done))
    return done


def is_compiled(module: nn.Module) -> bool:
    """Whether `module` was compiled in place."""
    return getattr(module, "_compiled_call_impl", None) is not None


def reset() -> None:
    """Forget every compiled graph (torch._dynamo.reset), e.g. between benchmarks of different settings."""
    torch._dynamo.reset()
