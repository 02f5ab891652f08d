"""Numeric precision: the dtype a model's weights are held in, and autocast for running it.

Two independent choices, as in the SD forks and diffusers:
- the weights' dtype (`--dtype fp32|bf16|fp16|auto`, diffusers' `torch_dtype`): half-precision weights halve the
  memory (an SD v1 UNet is 3.4 GB in fp32, 1.7 GB in fp16); each network casts its inputs to its own dtype and
  computes group-norm statistics, the KL posterior and VQ distances in float32;
- autocast (`--precision`): float32 weights, matrix products and convolutions in bf16 / fp16.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from enum import Enum
from typing import Iterator, Mapping, Optional, Union

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class WeightsDType(str, Enum):
    """Weights' dtype for loading a model; AUTO takes the checkpoint's own (an fp16 export stays fp16)."""
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    AUTO = "auto"


class Precision(str, Enum):
    """Sampling precision: full float32, or autocast to bfloat16 / float16 ("autocast", as CompVis' scripts, picks
    float16 on CUDA and bfloat16 elsewhere; "full" is float32)."""
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    AUTOCAST = "autocast"
    FULL = "full"


@contextlib.contextmanager
def precision_scope(precision: Union[Precision, str], device: Union[str, torch.device]) -> Iterator[None]:
    """torch.autocast for the reduced precisions, nothing for float32."""
    precision = Precision(precision)
    device_type = torch.device(device).type
    if precision in (Precision.FP32, Precision.FULL):
        yield
        return
    dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16,
             Precision.AUTOCAST: torch.float16 if device_type == "cuda" else torch.bfloat16}[precision]
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def state_dict_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating-point dtype holding most of a state dict's values (float32 when it has none)."""
    counts: Counter = Counter()
    for v in sd.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            counts[v.dtype] += v.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def resolve_weights_dtype(dtype: Optional[Union[WeightsDType, str, torch.dtype]],
                          state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Optional[torch.dtype]:
    """The torch dtype for `dtype` (None: leave the model as built); "auto" is the state dict's own dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        choice = WeightsDType(dtype)
    except ValueError:
        raise ValueError(f"weights dtype '{dtype}' unknown: use one of "
                         f"{', '.join(d.value for d in WeightsDType)}") from None
    if choice is WeightsDType.AUTO:
        return state_dict_dtype(state_dict) if state_dict is not None else None
    return DTYPES[choice.value]


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast `model`'s network weights to `dtype`: diffusion models through `set_weights_dtype` (their schedule
    stays float32), any other module entirely."""
    if hasattr(model, "set_weights_dtype"):
        return model.set_weights_dtype(dtype)
    return model.to(dtype)


# Elements in the probe of denormals_flushed: enough for torch to split an elementwise op over its intra-op threads.
_THREAD_PROBE_NUMEL = 1 << 20


def denormals_flushed() -> bool:
    """Whether this thread and every intra-op thread treat subnormal float32 values as zero (x86 FTZ/DAZ, Arm FZ)."""
    probe = torch.full((_THREAD_PROBE_NUMEL,), torch.finfo(torch.float32).tiny / 4)
    return bool((probe * 1.0 == 0).all())


def flush_denormals(enable: bool = True) -> bool:
    """Flush subnormal floats to zero on the CPU, in this thread and in the intra-op threads started after it (threads
    inherit the floating-point mode). A step on subnormal values runs many times slower: the gradients of saturated
    attention reach them early in training. Returns whether every intra-op thread now flushes them (False when the
    CPU cannot, or when torch's thread pool was started before this call)."""
    if not torch.set_flush_denormal(enable):
        return False
    return denormals_flushed() if enable else True
