"""Distillation of latent diffusion models as Lightning glue: guided, progressive and consistency distillation.

Each module is a LatentDiffusion (same first stage, conditioner, schedule and checkpoint keys) whose
`model` is the student, initialised from `ckpt_path` (the teacher's weights: its EMA weights when the
checkpoint has them, the ones it samples with). The teacher is a frozen copy of those weights under
`teacher.`; consistency distillation adds its target network under `target_model.`. Both are saved
with the run, so a resumed run continues exactly and a student checkpoint loads for sampling without
the teacher's file. The objectives are callables in ldm.modules.diffusionmodules.distillation.

    python main.py --base configs/distill/shapes_guided.yaml -t model.params.ckpt_path=<teacher LDM checkpoint>
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ldm.checkpoint import init_from_ckpt
from ldm.models.diffusion.diffusion_module import disabled_train
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.models.trainer_state import attached_trainer
from ldm.core.denoiser import Denoiser
from ldm.core.scaling import DenoiserScaling, scaling_for
from ldm.modules.diffusionmodules.distillation import (ConsistencyBoundary, ConsistencyDistillationLoss,
                                                       ConsistencyFunction, GuidanceScales, GuidedDistillationLoss,
                                                       ProgressiveDistillationLoss, Teacher, XWeighting,
                                                       check_halving)
from ldm.sampling import ApplyModelNetwork, CompVisDenoiser
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

GUIDANCE_KEY = "guidance_embed"  # parameter names of the UNet's guidance-scale embedding contain this


def frozen_copy(net: nn.Module, keep_guidance: bool) -> nn.Module:
    """A frozen, eval-mode copy of a UNet wrapper; without its guidance embedding unless `keep_guidance`."""
    out = copy.deepcopy(net)
    if not keep_guidance and getattr(out.diffusion_model, GUIDANCE_KEY, None) is not None:
        out.diffusion_model.guidance_embed = None
    out.eval()
    out.train = disabled_train.__get__(out)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


class Distillation(LatentDiffusion):
    """Base: a student LatentDiffusion with a frozen teacher copied from the weights it starts from."""

    # a run's checkpoints hold the student, the teacher and every other network: sampling needs no ckpt_path
    checkpoint_has_all_weights = True
    # prefixes of the frozen copies (saved with the run, never taken from a teacher checkpoint)
    copy_prefixes: tuple[str, ...] = ("teacher.",)
    # the teacher has the student's architecture (progressive rounds): it takes the scale when the student does
    teacher_like_student = False

    def frozen_unet_copies(self) -> list[nn.Module]:
        """The frozen teacher (sharded whole under FSDP, called but never trained)."""
        return [self.teacher]

    def __init__(self, *args: Any, guidance_scales: Sequence[float] = (1.0, 1.0),
                 teacher_takes_guidance: bool = False, x_weighting: str = XWeighting.SNR_PLUS_ONE.value,
                 teacher_parameterization: Optional[str] = None, **kwargs: Any):
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        if kwargs.get("cond_stage_trainable"):
            raise ConfigError("model.params.cond_stage_trainable: a student keeps its teacher's conditioner frozen; "
                              "set it to false")
        super().__init__(*args, **kwargs)
        self.scales = GuidanceScales(*guidance_scales)
        if self.scales.guided and not self.takes_guidance:
            raise ConfigError(f"model.params.guidance_scales {list(guidance_scales)}: a student that learns guidance "
                              f"takes the scale as an input; set model.params.unet_config.params.guidance_embed: true")
        if self.teacher_like_student:
            teacher_takes_guidance = self.takes_guidance
        if teacher_takes_guidance and not self.takes_guidance:
            raise ConfigError("model.params.teacher_takes_guidance: the teacher is a copy of the student's UNet, which "
                              "has no guidance embedding (unet_config.params.guidance_embed)")
        self.teacher_takes_guidance = bool(teacher_takes_guidance)
        self.x_weighting = XWeighting(x_weighting)
        try:  # a student may predict another quantity than its teacher (e.g. v from an eps teacher)
            self.teacher_scaling = (self.scaling if teacher_parameterization is None
                                    else scaling_for(teacher_parameterization))
        except ValueError as e:
            raise ConfigError(f"model.params.teacher_parameterization: {e}") from None
        self.teacher = frozen_copy(self.model, keep_guidance=self.teacher_takes_guidance)
        self.build_extras()
        self._loaded_takes_guidance: Optional[bool] = None
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    def build_extras(self) -> None:
        """Hook, before the teacher's weights are loaded: further copies of the student (consistency distillation's
        target network) and state buffers."""

    # -- starting from the teacher's weights -------------------------------------------------------------------
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        init_from_ckpt(self, path, ignore_keys=ignore_keys, tolerate_prefixes=("model_ema.",),
                       transform=lambda sd: self.adapt_loaded_state_dict(sd, str(path)))
        if self._loaded_takes_guidance and not self.teacher_takes_guidance:
            raise ConfigError(f"{path}: its UNet takes the guidance scale as an input (a guidance-distilled student); "
                              f"set model.params.teacher_takes_guidance: true")
        if self.teacher_takes_guidance and not self._loaded_takes_guidance:
            raise ConfigError(f"{path}: model.params.teacher_takes_guidance is true, but its UNet has no guidance "
                              f"embedding")
        self.start_from_loaded()

    def adapt_loaded_state_dict(self, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """The teacher's checkpoint made to fit: an earlier distillation run's copies dropped, a guidance embedding
        the checkpoint lacks kept at its initialisation (zero output), the copies filled (set from the student)."""
        sd = {k: v for k, v in sd.items() if not k.startswith(self.copy_prefixes) and k != "distill_round"}
        self._loaded_takes_guidance = any(GUIDANCE_KEY in k for k in sd if k.startswith("model."))
        for k, v in self.state_dict().items():
            if k not in sd and (GUIDANCE_KEY in k or k.startswith(self.copy_prefixes) or k == "distill_round"):
                sd[k] = v
        return sd

    @torch.no_grad()
    def start_from_loaded(self) -> None:
        """The student := the loaded sampling weights (EMA when kept), the teacher and the copies := the student."""
        if self.use_ema:
            self.model_ema.copy_to(self.model)
            self.model_ema.reset_to(self.model)
        self.load_copies_from_student()

    @torch.no_grad()
    def load_copies_from_student(self) -> None:
        student = self.model.state_dict()
        own = self.teacher.state_dict()
        self.teacher.load_state_dict({k: student[k] for k in own})

    # -- networks as denoisers -----------------------------------------------------------------------------
    def network_denoiser(self, net: nn.Module, scaling: Optional[DenoiserScaling] = None) -> Denoiser:
        """D(x, sigma) of one of this model's UNet wrappers (student, teacher, target), with gradients; the student's
        parameterization unless `scaling` is given."""
        return Denoiser(ApplyModelNetwork(self, net), scaling or self.scaling, self.noise_schedule)

    def teacher_fn(self) -> Teacher:
        return Teacher(self.network_denoiser(self.teacher, self.teacher_scaling),
                       takes_guidance=self.teacher_takes_guidance)

    def student_scales(self, n: int) -> Optional[torch.Tensor]:
        """Per-item guidance scales for a student that takes them, else None."""
        return self.scales.sample(n, self.device) if self.takes_guidance else None

    # -- training ------------------------------------------------------------------------------------------
    def distillation_inputs(self, batch: dict) -> tuple[torch.Tensor, Any, Any]:
        """(latents, condition, its unconditional twin) of a batch; no condition dropout."""
        z, c, xc = self.get_input(batch, self.first_stage_key, return_original_cond=True)
        uc = self.unconditional_like(c, xc) if c is not None and self.scales.guided else None
        return z, c, uc

    def shared_step(self, batch: dict):
        z, c, uc = self.distillation_inputs(batch)
        return self.distillation_loss(z, c, uc, "train" if self.training else "val")

    def distillation_loss(self, z: torch.Tensor, c: Any, uc: Any, prefix: str) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class GuidedDistillation(Distillation):
    """Guided distillation, stage 1 (Meng et al. 2023): one forward with the scale as input replaces guidance's two.

    `guidance_scales` [low, high]: the scales learnt, drawn uniformly per item. The student's UNet needs
    `guidance_embed: true`; at initialisation it is the teacher's conditional model for every scale.
    """

    def build_extras(self) -> None:
        if not self.scales.guided:
            raise ConfigError("model.params.guidance_scales: guided distillation learns guidance scales other than 1; "
                              "give [low, high], e.g. [1, 5]")
        self.distill_loss = GuidedDistillationLoss(self.noise_schedule, self.scales, self.x_weighting)

    def distillation_loss(self, z, c, uc, prefix):
        return self.distill_loss(self.network_denoiser(self.model), self.teacher_fn(), z, c, uc, prefix=prefix)


class ProgressiveDistillation(Distillation):
    """Progressive distillation (Salimans & Ho 2022), guided stage 2 of Meng et al. 2023 when the UNet takes the scale.

    `rounds`: the student's DDIM steps per round, each half the one before (e.g. [16, 8, 4]: the teacher
    samples with 32 steps in round 1); `round_steps` optimizer steps each. At the end of a round the
    student is saved as `round<k>_<N>steps.ckpt` next to the run's checkpoints, then becomes the teacher
    of the next round (its EMA weights when kept). The round in progress is a buffer of the checkpoint,
    so a resumed run continues the right round with the right teacher.
    """

    def __init__(self, *args: Any, rounds: Sequence[int] = (4,), round_steps: int = 1000, **kwargs: Any):
        try:
            self.rounds = check_halving(rounds)
        except ValueError as e:
            raise ConfigError(f"model.params.rounds: {e}") from None
        if int(round_steps) < 1:
            raise ConfigError(f"model.params.round_steps must be >= 1, got {round_steps}")
        self.round_steps = int(round_steps)
        kwargs.pop("teacher_takes_guidance", None)  # the teacher is the previous round's student
        super().__init__(*args, **kwargs)
        self.sample_steps = self.rounds[0]
        self._saved_round = -1

    teacher_like_student = True

    def build_extras(self) -> None:
        self.register_buffer("distill_round", torch.tensor(0, dtype=torch.long))
        self.distill_loss = ProgressiveDistillationLoss(self.noise_schedule, self.x_weighting)

    @property
    def round_due(self) -> int:
        """The round the global step is in (the last one continues past its end)."""
        return min(self.global_step // self.round_steps, len(self.rounds) - 1)

    def on_fit_start(self) -> None:
        total = self.round_steps * len(self.rounds)
        if self.trainer.max_steps is not None and 0 < self.trainer.max_steps < total:
            logger.warning("progressive distillation: lightning.trainer.max_steps %d ends before the last of %d rounds "
                           "of %d steps (%d)", self.trainer.max_steps, len(self.rounds), self.round_steps, total)

    @torch.no_grad()
    def on_train_batch_start(self, batch, batch_idx) -> None:
        super().on_train_batch_start(batch, batch_idx)
        while int(self.distill_round) < self.round_due:  # a round ended (or a resume lands past it): next teacher
            self.start_from_loaded()
            self.distill_round += 1
            logger.info("progressive distillation: round %d of %d, %d -> %d steps", int(self.distill_round) + 1,
                        len(self.rounds), 2 * self.rounds[int(self.distill_round)], self.rounds[int(self.distill_round)])
        self.sample_steps = self.rounds[int(self.distill_round)]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        done, rest = divmod(self.global_step, self.round_steps)
        if rest == 0 and 1 <= done <= len(self.rounds) and done != self._saved_round \
                and attached_trainer(self) is not None:
            self._saved_round = done
            steps = self.rounds[done - 1]
            cb = self.trainer.checkpoint_callback
            folder = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(self.trainer.default_root_dir)
            path = folder / f"round{done}_{steps}steps.ckpt"
            self.trainer.save_checkpoint(path, weights_only=False)
            logger.info("progressive distillation: round %d done, the %d-step student saved to %s", done, steps, path)

    def teacher_fn(self) -> Teacher:
        if int(self.distill_round) > 0:  # the previous round's student: the student's parameterization
            return Teacher(self.network_denoiser(self.teacher), takes_guidance=self.teacher_takes_guidance)
        return super().teacher_fn()

    def distillation_loss(self, z, c, uc, prefix):
        steps = self.rounds[int(self.distill_round)]
        loss, log = self.distill_loss(self.network_denoiser(self.model), self.teacher_fn(), z, c, steps,
                            scale=self.student_scales(z.shape[0]), prefix=prefix)
        log[f"{prefix}/student_steps"] = torch.tensor(float(steps))
        return loss, log


class ConsistencyDistillation(Distillation):
    """Conditional consistency distillation (Song et al. 2023; Mei et al. 2024, CoDi; latent consistency models).

    The student is the consistency function f = c_skip x + c_out D_student (ConsistencyBoundary); the
    target network `target_model` is an EMA of the student with `target_decay`; the teacher's guided ODE
    is stepped with DDIM over `num_intervals` intervals. It samples with the `consistency` sampler.
    """

    copy_prefixes = ("teacher.", "target_model.")

    def __init__(self, *args: Any, num_intervals: int = 50, target_decay: float = 0.95, sigma_data: float = 0.5,
                 timestep_scaling: float = 10.0, loss_type: str = "l2", huber_c: float = 1e-3, **kwargs: Any):
        if not 0.0 <= target_decay < 1.0:
            raise ConfigError(f"model.params.target_decay must lie in [0, 1), got {target_decay}")
        self.target_decay = float(target_decay)
        self.boundary = ConsistencyBoundary(sigma_data, timestep_scaling)
        self.num_intervals, self.loss_type, self.huber_c = int(num_intervals), loss_type, float(huber_c)
        super().__init__(*args, **kwargs)
        self._target_step = -1

    def frozen_unet_copies(self) -> list[nn.Module]:
        return super().frozen_unet_copies() + [self.target_model]

    def build_extras(self) -> None:
        self.target_model = frozen_copy(self.model, keep_guidance=True)
        self.distill_loss = ConsistencyDistillationLoss(self.noise_schedule, self.num_intervals, self.loss_type,
                                                        self.huber_c)

    @torch.no_grad()
    def load_copies_from_student(self) -> None:
        super().load_copies_from_student()
        self.target_model.load_state_dict(self.model.state_dict())

    def denoiser(self, quantize: bool = False) -> ConsistencyFunction:
        """The consistency function of the student, f(x, sigma), for ldm.sampling (the `consistency` sampler)."""
        return ConsistencyFunction(CompVisDenoiser(self, quantize=quantize), self.boundary)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.global_step != self._target_step:  # once per optimizer step: target <- EMA of the student
            self._target_step = self.global_step
            with torch.no_grad():
                target = [p for p in self.target_model.parameters()]
                student = [p.detach() for p in self.model.parameters()]
                torch._foreach_lerp_(target, student, 1.0 - self.target_decay)

    def distillation_loss(self, z, c, uc, prefix):
        return self.distill_loss(ConsistencyFunction(self.network_denoiser(self.model), self.boundary),
                       ConsistencyFunction(self.network_denoiser(self.target_model), self.boundary),
                       self.teacher_fn(), z, c, uc, scale=self.student_scales(z.shape[0]), prefix=prefix)
