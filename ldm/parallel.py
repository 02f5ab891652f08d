"""Fully sharded data parallel training (FSDP2, torch.distributed.fsdp.fully_shard) through Lightning.

`FSDP` is Lightning's ModelParallelStrategy with every process in one data-parallel group: the model's
`configure_model` hook shards the UNet block by block (`shard_diffusion_model`), so each process holds
1/N of the trainable weights, their gradients, the optimizer state and the EMA copy. It runs on any
accelerator Lightning has, the CPU (gloo) included. Choose it in the config:

    lightning:
      trainer:
        strategy: fsdp                      # or {target: ldm.parallel.FSDP, params: {mixed_precision: bf16-mixed}}

Checkpoints are whole files by default (`state_dict: full`, gathered on rank 0, loadable by everything
that reads a checkpoint); `state_dict: sharded` writes a torch.distributed.checkpoint folder per save,
one file per rank, which ldm.checkpoint.load_checkpoint reads gathered (so every script reads it, and
`scripts/convert.py --ckpt <folder> --out model.ckpt` exports a plain checkpoint).
"""
from __future__ import annotations

import logging
from enum import Enum
from typing import Any, Iterable, Optional

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)


class StateDictType(str, Enum):
    FULL = "full"
    SHARDED = "sharded"


# FSDP2's mixed precision: the dtype of the gathered parameters in forward / backward; gradients are reduced in float32
PARAM_DTYPES = {None: None, "32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16,
                "16-mixed": torch.float16, "fp16": torch.float16}


class FSDP(ModelParallelStrategy):
    """FSDP2 data parallelism: all processes (devices x nodes) shard the UNet; no tensor parallelism."""

    def __init__(self, mixed_precision: Optional[str] = None, reshard_after_forward: bool = True,
                 state_dict: str = StateDictType.FULL.value, **kwargs: Any):
        if mixed_precision not in PARAM_DTYPES:
            raise ValueError(f"FSDP mixed_precision '{mixed_precision}' unknown: use one of "
                             f"{', '.join(str(k) for k in PARAM_DTYPES if k)}")
        try:
            self.state_dict_type = StateDictType(state_dict)
        except ValueError:
            raise ValueError(f"FSDP state_dict '{state_dict}' unknown: use full or sharded") from None
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=self.state_dict_type is StateDictType.SHARDED, **kwargs)
        self.param_dtype = PARAM_DTYPES[mixed_precision]
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        # one data-parallel group of every process (the parent's "auto" would make it one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard_kwargs(self) -> dict[str, Any]:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        kwargs: dict[str, Any] = {"mesh": self.device_mesh["data_parallel"],
                                  "reshard_after_forward": self.reshard_after_forward}
        if self.param_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        return kwargs


def strategy_from_config(value: Any) -> Any:
    """`lightning.trainer.strategy`: "fsdp" is FSDP2 here (Lightning's own "fsdp" is FSDP1, GPU only); a mapping
    with `target` is instantiated; anything else goes to Lightning as it is."""
    if value == "fsdp":
        return FSDP()
    if isinstance(value, dict):
        return instantiate_from_config(value, key="lightning.trainer.strategy")
    return value


def check_shardable(model: nn.Module) -> None:
    """FSDP here shards a diffusion model's UNet; refuse other models (autoencoders train with DDP) by name."""
    if not hasattr(getattr(model, "model", None), "diffusion_model"):
        raise ConfigError(f"lightning.trainer.strategy: FSDP shards a diffusion model's UNet, and "
                          f"{type(model).__module__}.{type(model).__name__} has none; train it with strategy: ddp")


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The units FSDP gathers one at a time: the network's `block_units()` (none: the network is one unit)."""
    return list(unet.block_units()) if hasattr(unet, "block_units") else []


def shard_diffusion_model(model: nn.Module, strategy: FSDP) -> None:
    """fully_shard the UNet's blocks, then its wrapper (the rest of its weights), and a trainable conditioner; the EMA
    copy is sharded like the weights it follows. Frozen networks (the first stage, a frozen conditioner) stay whole
    on every process. Trainable weights left outside these would not be synchronised: they are refused."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    wrapper = model.model
    # fully_shard refuses non-contiguous parameters: the UNet's channels-last conv weights (and their EMA copies)
    # go back to the usual layout
    model.to(memory_format=torch.contiguous_format)
    kwargs = strategy.shard_kwargs()
    for block in unet_blocks(wrapper.diffusion_model):
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, **kwargs)
    fully_shard(wrapper, **kwargs)
    copies = model.frozen_unet_copies() if hasattr(model, "frozen_unet_copies") else []
    for copy in copies:  # a distillation teacher, a target network: gathered whole when called
        fully_shard(copy, **kwargs)
    conditioner = getattr(model, "conditioner", None)  # each embedder (CompVis: the cond_stage_model)
    for cond in ([e.module for e in conditioner.entries] if conditioner is not None else []):
        if any(p.requires_grad for p in cond.parameters()):
            fully_shard(cond, **kwargs)
            if hasattr(cond, "encode"):  # LatentDiffusion calls encode(), not forward(): gather around it too
                register_fsdp_forward_method(cond, "encode")
    if getattr(model, "use_ema", False):
        shard_ema_like(model.model_ema, wrapper)
    left = [name for name, p in model.named_parameters() if p.requires_grad and not is_sharded([p])]
    if left:
        raise ConfigError(f"lightning.trainer.strategy: FSDP shards the UNet and a trainable conditioner; these "
                          f"trainable parameters are outside them and would differ between processes: "
                          f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''} (freeze them or use strategy: ddp)")
    n = sum(p.numel() for p in wrapper.parameters())
    logger.info("FSDP: the UNet (%d parameters) sharded over %d processes", n, strategy.device_mesh.size())


@torch.no_grad()
def shard_ema_like(ema: nn.Module, model: nn.Module) -> None:
    """Each EMA shadow buffer made a DTensor with its parameter's mesh and placements (each rank keeps its shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    for name, p in model.named_parameters():
        s_name = ema.m_name2s_name.get(name)
        if s_name is None or not isinstance(p, DTensor):
            continue
        full = ema._buffers[s_name]
        ema._buffers[s_name] = distribute_tensor(full.to(p.device), p.device_mesh, p.placements)


def is_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(t, DTensor) for t in tensors)
