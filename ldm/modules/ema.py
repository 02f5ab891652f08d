"""Exponential moving average of a module's parameters with CompVis checkpoint keys (`model_ema.<name without dots>`)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA shadow parameters as buffers; decay warms up as min(decay, (1 + n) / (10 + n)) with `use_num_upates`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("decay must be between 0 and 1")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone().float())
        self.collected_params: list[torch.Tensor] = []
        # (model, [(owning module, parameter's local name, shadow name)]): resolved once per model, so an update does
        # not walk the module tree; the tensors themselves are looked up at each update (`.to()` and sharding
        # replace them)
        self._owners: Optional[tuple[nn.Module, list[tuple[nn.Module, str, str]]]] = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_owners"] = None  # copies and pickles resolve their own
        return state

    def _tracked(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The shadow buffers and `model`'s parameters they follow, in matching order."""
        if self._owners is None or self._owners[0] is not model:
            owners = []
            for name, _ in model.named_parameters():
                if name in self.m_name2s_name:
                    module_name, _, local = name.rpartition(".")
                    owners.append((model.get_submodule(module_name), local, self.m_name2s_name[name]))
            self._owners = (model, owners)
        owners = self._owners[1]
        return [self._buffers[s] for _, _, s in owners], [m._parameters[n] for m, n, _ in owners]

    @torch.no_grad()
    def reset_to(self, model: nn.Module) -> None:
        """Shadow weights := `model`'s current weights, update count 0."""
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                shadow[self.m_name2s_name[name]].copy_(p.detach())
        self.reset_num_updates()

    def reset_num_updates(self) -> None:
        if int(self.num_updates) >= 0:  # -1: use_num_upates off
            self.num_updates.zero_()

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from `model`'s current parameters: decay and count stay on the device and the update is
        one batch of foreach ops, so a training step never waits for the host."""
        counting = self.num_updates >= 0  # -1: use_num_upates off
        self.num_updates.add_(counting.to(self.num_updates.dtype))
        n = self.num_updates.double()
        decay = torch.where(counting, torch.minimum(self.decay.double(), (1 + n) / (10 + n)), self.decay.double())
        one_minus = (1.0 - decay).float()
        shadows, params = self._tracked(model)
        params = [p if p.dtype == s.dtype else p.to(s.dtype) for s, p in zip(shadows, params)]
        if not shadows:
            return
        if shadows[0].device.type == "cpu":
            # s <- s + (1 - decay) (p - s) as one op per tensor: torch's CPU foreach ops run tensor by tensor, so one
            # lerp costs a third of sub, mul, sub (0.8 against 2.5 ms for 300 tensors here)
            torch._foreach_lerp_(shadows, params, [one_minus] * len(shadows))
        else:  # three fused foreach kernels: lerp with a tensor weight per tensor leaves CUDA's fused path
            step = torch._foreach_sub(shadows, params)
            torch._foreach_mul_(step, one_minus)
            torch._foreach_sub_(shadows, step)  # s <- s - (1 - decay) (s - p)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                p.data.copy_(shadow[self.m_name2s_name[name]].to(p.dtype))

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        self.collected_params = [p.detach().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        for c, p in zip(self.collected_params, parameters):
            p.data.copy_(c)
        self.collected_params = []

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[None]:
        """Use the EMA weights inside the block, the training weights after it."""
        self.store(model.parameters())
        self.copy_to(model)
        try:
            yield
        finally:
            self.restore(model.parameters())
