"""Distillation objectives as callables: guided distillation, progressive distillation, consistency distillation.

All three work in the variance-exploding view the samplers use (x = x0 + sigma * eps, a denoiser
D(x, sigma) returns the x0 estimate; ldm.core.denoiser), on networks given to
them: the student (with gradients), a frozen teacher, and for consistency distillation a target
network. Guidance scales are in the convention of the rest of the framework, u + s (c - u) (Meng et
al.'s w is s - 1). Which teacher, which weights, which rounds: the Lightning glue
(ldm.models.diffusion.distillation).
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ldm.core.algebra import cat_conditioning, cfg_combine, ddim_move
from ldm.core.denoiser import DiscreteSchedule, append_dims
from ldm.core.spacing import Spacing, get_sigmas

DenoiserFn = Callable[..., torch.Tensor]


class XWeighting(str, Enum):
    """Weight of an x0-space regression at noise level sigma (SNR = 1 / sigma^2 in the VE view)."""
    SNR_PLUS_ONE = "snr_plus_one"    # 1 + SNR: the v-prediction loss written on x0 (Salimans & Ho 2022)
    TRUNCATED_SNR = "truncated_snr"  # max(SNR, 1) (Salimans & Ho 2022)
    CONSTANT = "constant"            # 1


def x_weight(kind: Union[XWeighting, str], sigma: torch.Tensor) -> torch.Tensor:
    """Per-item weight of `kind` at per-item `sigma`."""
    kind = XWeighting(kind)
    snr = sigma.double().pow(-2)
    if kind is XWeighting.SNR_PLUS_ONE:
        return (snr + 1).float()
    if kind is XWeighting.TRUNCATED_SNR:
        return snr.clamp_min(1).float()
    return torch.ones_like(sigma, dtype=torch.float32)


def per_item_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class GuidanceScales:
    """The guidance scales a student learns: s ~ U[low, high] per item (Meng et al. 2023 sample w = s - 1 likewise)."""

    def __init__(self, low: float = 1.0, high: Optional[float] = None):
        high = low if high is None else high
        if not 0.0 <= low <= high:
            raise ValueError(f"guidance_scales: need 0 <= low <= high, got [{low}, {high}]")
        self.low, self.high = float(low), float(high)

    @property
    def guided(self) -> bool:
        """Whether any scale other than 1 (the conditional model alone) is learnt."""
        return not (self.low == self.high == 1.0)

    def sample(self, n: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        u = torch.rand(n, device=device, generator=generator)
        return self.low + (self.high - self.low) * u


def _kwargs(cond: Any, guidance: Optional[torch.Tensor]) -> dict:
    return {"c": cond} if guidance is None else {"c": cond, "guidance": guidance}


class Teacher:
    """A frozen denoiser's guided x0 estimate at per-item scales s: one forward when the network takes s as an input
    (a guidance-distilled teacher), else classifier-free guidance u + s (c - u) in one batched forward."""

    def __init__(self, denoiser: DenoiserFn, takes_guidance: bool = False):
        self.denoiser, self.takes_guidance = denoiser, takes_guidance

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond: Any,
                 scale: Optional[torch.Tensor]) -> torch.Tensor:
        if self.takes_guidance:
            return self.denoiser(x, sigma, **_kwargs(cond, scale))
        if scale is None:  # unguided
            return self.denoiser(x, sigma, c=cond)
        if uncond is None:  # no unconditional input: only scale 1 (the conditional model) is defined
            if bool((scale == 1).all()):
                return self.denoiser(x, sigma, c=cond)
            raise ValueError("guided distillation needs the unconditional input of the teacher")
        out_u, out_c = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                     c=cat_conditioning(uncond, cond)).chunk(2)
        return cfg_combine(out_u, out_c, scale.to(x.dtype))


class GuidedDistillationLoss:
    """Stage 1 of Meng et al. 2023: the student, given the scale s as an input, regresses the teacher's guided x0
    estimate at s (two teacher evaluations become one student evaluation); t ~ U{0..T-1}."""

    def __init__(self, schedule: DiscreteSchedule, scales: GuidanceScales,
                 weighting: Union[XWeighting, str] = XWeighting.SNR_PLUS_ONE):
        self.schedule, self.scales, self.weighting = schedule, scales, XWeighting(weighting)

    def __call__(self, student: DenoiserFn, teacher: Teacher, x0: torch.Tensor, cond: Any, uncond: Any,
                 prefix: str = "train") -> tuple[torch.Tensor, dict]:
        n = x0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (n,), device=x0.device)
        sigma = self.schedule.sigmas.to(x0.device)[t]
        x = x0 + append_dims(sigma, x0.dim()) * torch.randn_like(x0)
        scale = self.scales.sample(n, x0.device)
        target = teacher(x, sigma, cond, uncond, scale)
        pred = student(x, sigma, **_kwargs(cond, scale))
        mse = per_item_mse(pred, target)
        loss = (x_weight(self.weighting, sigma) * mse).mean()
        return loss, {f"{prefix}/loss": loss.detach(), f"{prefix}/x0_mse": mse.mean().detach()}


def progressive_grid(schedule: DiscreteSchedule, student_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher sigmas for 2N steps, student sigmas for N steps), trailing spacing, ending at sigma 0.

    The student's levels are every other teacher level, so each student step spans two teacher steps
    exactly; they are the levels `get_sigmas(schedule, N, "trailing")` samples the student with.
    """
    teacher = get_sigmas(schedule, 2 * student_steps, Spacing.TRAILING)
    return teacher, teacher[0::2]


class ProgressiveDistillationLoss:
    """Salimans & Ho 2022, Alg. 2: one student DDIM step matches two teacher DDIM steps.

    From z at level s, the teacher steps to the midpoint and on to s'' (its 2N-step grid); the target
    is the x0 with which one DDIM step from z lands where the teacher did, (x'' - (s''/s) z) / (1 - s''/s)
    in VE form (the x-space target of Salimans & Ho, eq. 8 there), regressed with `weighting`.
    """

    def __init__(self, schedule: DiscreteSchedule, weighting: Union[XWeighting, str] = XWeighting.SNR_PLUS_ONE):
        self.schedule, self.weighting = schedule, XWeighting(weighting)
        self._levels: dict[int, torch.Tensor] = {}  # the teacher's grid per student step count

    def levels(self, student_steps: int) -> torch.Tensor:
        if student_steps not in self._levels:
            self._levels[student_steps] = progressive_grid(self.schedule, student_steps)[0]
        return self._levels[student_steps]

    def __call__(self, student: DenoiserFn, teacher: Teacher, x0: torch.Tensor, cond: Any, student_steps: int,
                 scale: Optional[torch.Tensor] = None, prefix: str = "train") -> tuple[torch.Tensor, dict]:
        levels = self.levels(student_steps).to(x0.device)
        i = 2 * torch.randint(0, student_steps, (x0.shape[0],), device=x0.device)
        s, s_mid, s_next = levels[i], levels[i + 1], levels[i + 2]
        z = x0 + append_dims(s, x0.dim()) * torch.randn_like(x0)
        with torch.no_grad():
            z_mid = ddim_move(z, s, s_mid, teacher(z, s, cond, None, scale))
            z_next = ddim_move(z_mid, s_mid, s_next, teacher(z_mid, s_mid, cond, None, scale))
            r = append_dims(s_next / s, x0.dim()).to(x0.dtype)
            target = (z_next - r * z) / (1 - r)
        pred = student(z, s, **_kwargs(cond, scale))
        mse = per_item_mse(pred, target)
        loss = (x_weight(self.weighting, s) * mse).mean()
        return loss, {f"{prefix}/loss": loss.detach(), f"{prefix}/x0_mse": mse.mean().detach()}


class ConsistencyBoundary:
    """c_skip, c_out of a consistency model in timestep units u = t * timestep_scaling (Song et al. 2023, with the
    scaling of latent consistency models, Luo et al. 2023): c_skip = d^2 / (u^2 + d^2), c_out = u / sqrt(u^2 + d^2),
    d = sigma_data; at t = 0 they are exactly 1 and 0, so f(x, sigma_min) = x."""

    def __init__(self, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        self.sigma_data, self.timestep_scaling = float(sigma_data), float(timestep_scaling)

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = t.double() * self.timestep_scaling
        d2 = self.sigma_data ** 2
        return (d2 / (u * u + d2)).float(), (u / (u * u + d2).sqrt()).float()


class ConsistencyFunction(nn.Module):
    """f(x, sigma) = c_skip x + c_out D(x, sigma): a consistency model over a denoiser with a discrete schedule."""

    def __init__(self, denoiser: nn.Module, boundary: ConsistencyBoundary):
        super().__init__()
        self.inner, self.boundary = denoiser, boundary

    @property
    def schedule(self) -> DiscreteSchedule:
        return self.inner.schedule

    def forward(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], **cond) -> torch.Tensor:
        sigma = self.inner._sigma(sigma, x)
        c_skip, c_out = self.boundary(self.schedule.sigma_to_t(sigma).to(x.device))
        denoised = self.inner(x, sigma, **cond)
        return append_dims(c_skip, x.dim()).to(x.dtype) * x + append_dims(c_out, x.dim()).to(x.dtype) * denoised


class ConsistencyLossType(str, Enum):
    """Distance between the online and the target consistency outputs."""
    L2 = "l2"
    PSEUDO_HUBER = "pseudo_huber"  # sqrt(d^2 + c^2) - c, element-wise (Song & Dhariwal 2023; LCM's "huber")


def consistency_grid(schedule: DiscreteSchedule, intervals: int) -> torch.Tensor:
    """Ascending levels sigma(t_n), t_n = round(n (T - 1) / N), n = 0..N: t_0 = 0 is the boundary."""
    if not 1 <= intervals < schedule.num_timesteps:
        raise ValueError(f"consistency distillation: num_intervals must lie in [1, {schedule.num_timesteps - 1}], "
                         f"got {intervals}")
    t = torch.round(torch.linspace(0, schedule.num_timesteps - 1, intervals + 1, dtype=torch.float64)).long()
    return schedule.sigmas[t]


class ConsistencyDistillationLoss:
    """Consistency distillation (Song et al. 2023, Alg. 2) from a guided teacher (CoDi, Mei et al. 2024; LCM):
    f_theta(x_{n+1}, s_{n+1}) regresses f_target(x_n^, s_n), where x_n^ is one DDIM step of the teacher's guided
    ODE from x_{n+1} and f_target is the target network (an EMA of the student)."""

    def __init__(self, schedule: DiscreteSchedule, num_intervals: int = 50,
                 loss_type: Union[ConsistencyLossType, str] = ConsistencyLossType.L2, huber_c: float = 1e-3):
        self.schedule, self.loss_type, self.huber_c = schedule, ConsistencyLossType(loss_type), huber_c
        self.levels = consistency_grid(schedule, num_intervals)

    @property
    def num_intervals(self) -> int:
        return self.levels.shape[0] - 1

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = a.float() - b.float()
        if self.loss_type is ConsistencyLossType.PSEUDO_HUBER:
            return ((d * d + self.huber_c ** 2).sqrt() - self.huber_c).flatten(1).mean(1)
        return d.pow(2).flatten(1).mean(1)

    def __call__(self, student: DenoiserFn, target: DenoiserFn, teacher: Teacher, x0: torch.Tensor, cond: Any,
                 uncond: Any, scale: Optional[torch.Tensor] = None, prefix: str = "train") -> tuple[torch.Tensor, dict]:
        levels = self.levels.to(x0.device)
        n = torch.randint(0, self.num_intervals, (x0.shape[0],), device=x0.device)
        s_hi, s_lo = levels[n + 1], levels[n]
        x = x0 + append_dims(s_hi, x0.dim()) * torch.randn_like(x0)
        with torch.no_grad():
            x_lo = ddim_move(x, s_hi, s_lo, teacher(x, s_hi, cond, uncond, scale))
            goal = target(x_lo, s_lo, **_kwargs(cond, scale))
        pred = student(x, s_hi, **_kwargs(cond, scale))
        loss = self.distance(pred, goal).mean()
        return loss, {f"{prefix}/loss": loss.detach(), f"{prefix}/x0_mse": per_item_mse(pred, x0).mean().detach()}


def check_halving(rounds: Sequence[int]) -> list[int]:
    """The student step counts of progressive rounds: positive, each half the previous one."""
    rounds = [int(r) for r in rounds]
    if not rounds or any(r < 1 for r in rounds):
        raise ValueError(f"rounds must be a non-empty list of positive step counts, got {rounds}")
    bad = [(a, b) for a, b in zip(rounds, rounds[1:]) if a != 2 * b]
    if bad:
        raise ValueError(f"rounds {rounds}: each round halves the steps of the one before ({bad[0][0]} -> "
                         f"{bad[0][1]} does not)")
    return rounds
