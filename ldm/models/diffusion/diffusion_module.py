"""DDPM (Ho et al. 2020) as Lightning glue over small math modules; LatentDiffusion (.latent) subclasses it.

Schedule: ldm.modules.diffusionmodules.schedule; eps/x0/v: .denoiser_scaling; loss, timestep sampling
and weighting: .loss; sampling: ldm.sampling. Attribute names (`model.diffusion_model`,
`first_stage_model`, `cond_stage_model`, `model_ema`) and buffer names are the CompVis checkpoint
layout; users import both classes from the CompVis path ldm.models.diffusion.ddpm.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from enum import Enum
from typing import Any, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

from ldm.checkpoint import ModelKind, init_from_ckpt
from ldm.compile import CompileSettings, compile_networks
from ldm.config_keys import accepted_keys, report_no_effect
from ldm.lora import LoraFineTuning, LoraSettings
from ldm.modules.diffusionmodules.batch_random import GlobalBatchRandom
from ldm.core.scaling import scaling_for
from ldm.modules.diffusionmodules.loss import DiffusionLoss, SimpleWeighting, UniformTimesteps, vlb_weights
from ldm.modules.diffusionmodules.schedule import ddpm_buffers, extract_into_tensor, make_beta_schedule, \
    rescale_zero_terminal_snr
from ldm.modules.ema import LitEma
from ldm.parallel import FSDP, is_sharded, shard_diffusion_model
from ldm import generation
from ldm.models.trainer_state import attached_trainer, training_batches_started
from ldm.modules.model_inputs import ConditionInput, InpaintMode, prior_weights, with_prior
from ldm.core.denoiser import Denoiser, DiscreteSchedule
from ldm.sampling import ApplyModelNetwork, CompVisDenoiser, Conditioning, Spacing
from ldm.sampling.samplers import Generator
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

__conditioning_keys__ = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "y"}


class ConditioningKey(str, Enum):
    """How DiffusionWrapper routes the conditioning into the UNet (CompVis `conditioning_key`). A str enum: configs
    and users' code that compare it with the strings keep working."""
    CONCAT = "concat"          # c_concat channels concatenated to x
    CROSSATTN = "crossattn"    # c_crossattn as the cross-attention context
    HYBRID = "hybrid"          # both
    ADM = "adm"                # c_crossattn[0] as the class / vector label y
    HYBRID_ADM = "hybrid-adm"  # concat + cross-attention + c_adm as y (SD2 x4 upscaler)
    ROUTED = "routed"          # each input given goes to its place (an embedder list: conditioner_config)

    @property
    def reads_text(self) -> bool:
        """Whether the UNet has a cross-attention context."""
        return self in (ConditioningKey.CROSSATTN, ConditioningKey.HYBRID, ConditioningKey.HYBRID_ADM)

    @property
    def concatenates(self) -> bool:
        """Whether channels are concatenated to the UNet's input."""
        return self in (ConditioningKey.CONCAT, ConditioningKey.HYBRID, ConditioningKey.HYBRID_ADM)

    @property
    def plain_key(self) -> str:
        """The key a bare (non-dict) conditioning goes under: c_concat for concat, else c_crossattn (adm reads it)."""
        return "c_concat" if self is ConditioningKey.CONCAT else "c_crossattn"

    @classmethod
    def parse(cls, key: Optional[str]) -> Optional["ConditioningKey"]:
        """None (unconditional) or the enum member of `key`; an unknown key is an error naming the known ones."""
        if key is None:
            return None
        try:
            return cls(key)
        except ValueError:
            raise ValueError(f"conditioning_key '{key}' unknown: use {', '.join(k.value for k in cls)}") from None


def _fused_ok(params: Sequence[torch.Tensor]) -> bool:
    """Whether the fused (single-kernel) AdamW applies: all parameters floating point on one CPU or CUDA device."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


def gradients_in_parameter_layout(optimizer: torch.optim.Optimizer, args: Any = None, kwargs: Any = None) -> None:
    """Step pre-hook of a fused CPU AdamW: a gradient whose strides differ from its parameter's is first copied into
    the parameter's layout. torch's fused CPU kernel pairs their elements by memory order without checking, so a
    channels-last conv weight given a contiguous gradient would be updated with the wrong elements (the CUDA kernel
    raised an error on such pairs in pytorch #106951). Autograd keeps the layouts matched; a hook or a compiled
    backward may not."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            grad = p.grad
            if grad is not None and grad.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(grad)


def disabled_train(self, mode: bool = True):
    """Overwrites model.train so that a frozen model stays in eval mode."""
    return self


class DiffusionWrapper(nn.Module):
    """Routes conditioning into the UNet: c_concat channels concatenated to x, c_crossattn as the cross-attention
    context (concatenated on features), c_adm as the vector input y; CompVis' `adm` takes y from c_crossattn[0].
    Any other keyword (a video UNet's num_video_frames) goes to the UNet, which refuses those it does not take."""

    def __init__(self, diff_model_config, conditioning_key: Optional[str]):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config, key="model.params.unet_config")
        self.conditioning_key = ConditioningKey.parse(conditioning_key)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Optional[list] = None,
                c_crossattn: Optional[list] = None, c_adm: Optional[torch.Tensor] = None,
                guidance: Optional[torch.Tensor] = None, **inputs: Any) -> torch.Tensor:
        """`guidance`: the guidance scale, for a UNet that takes it as an input (guidance-distilled students)."""
        if guidance is not None:
            inputs["guidance"] = guidance
        if self.conditioning_key is ConditioningKey.ADM and c_adm is None:  # class / vector conditioning
            return self.diffusion_model(x, t, y=c_crossattn[0], **inputs)
        if c_concat is not None:
            x = torch.cat([x] + list(c_concat), dim=1)
        if c_crossattn is not None:
            inputs["context"] = torch.cat(list(c_crossattn), 1)
        if c_adm is not None:
            inputs["y"] = c_adm
        return self.diffusion_model(x, t, **inputs)

    @property
    def takes_guidance(self) -> bool:
        """Whether the UNet takes the guidance scale as an input (one forward per step instead of two)."""
        return getattr(self.diffusion_model, "guidance_embed", None) is not None


class DDPM(pl.LightningModule):
    """Denoising diffusion in pixel (or, subclassed, latent) space with the CompVis config keys."""

    model_kind = ModelKind.DIFFUSION  # what the scripts call it (ldm.checkpoint.target_kind)
    # shown by main.py's progress bar when it refreshes (ldm.callbacks.bounded_progress_bar), read from the callback
    # metrics: logged with prog_bar=True, Lightning would read them on the host after every step
    progress_bar_keys = ("loss",)
    # whether this training step's scalars will be read: set before each batch by ldm.callbacks.LogWhereRead (main.py
    # adds it), which asks the trainer; logging on the other steps costs host time only
    log_scalars_now: bool = True

    def __init__(self, unet_config, timesteps: int = 1000, beta_schedule: str = "linear", loss_type: str = "l2",
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (), load_only_unet: bool = False,
                 monitor: str = "val/loss", use_ema: bool = True, first_stage_key: str = "image", image_size: int = 256,
                 channels: int = 3, log_every_t: int = 100, clip_denoised: bool = True, linear_start: float = 1e-4,
                 linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas: Optional[Sequence[float]] = None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: Optional[str] = None, parameterization: str = "eps",
                 scheduler_config=None, use_positional_encodings: bool = False, learn_logvar: bool = False,
                 logvar_init: float = 0.0, zero_terminal_snr: bool = False, offset_noise: float = 0.0,
                 loss_weighting=None, timestep_sampler=None, ema_decay: float = 0.9999, ucg_rate: float = 0.0,
                 sample_steps: int = 50, sampler: str = "ddim", guidance_scale: float = 1.0,
                 sample_spacing: str = "uniform", lora_config=None,
                 prior_loss_weight: float = 1.0, compile: Any = None, noise_seed: Optional[int] = None):
        super().__init__()
        report_no_effect("DDPM", [k for k, given in (("log_every_t", log_every_t != 100),
                                                     ("use_positional_encodings", use_positional_encodings)) if given])
        self.scaling = scaling_for(parameterization)
        self.parameterization = self.scaling.parameterization
        self.cond_stage_model = None
        self.clip_denoised, self.log_every_t = clip_denoised, log_every_t
        self.first_stage_key, self.image_size, self.channels = first_stage_key, image_size, channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
            self.register_load_state_dict_post_hook(_ema_from_loaded_weights)
        self._ema_step = -1
        self.scheduler_config = scheduler_config
        self.v_posterior, self.original_elbo_weight, self.l_simple_weight = v_posterior, original_elbo_weight, l_simple_weight
        self.loss_type = loss_type
        self.ucg_rate = ucg_rate
        self.prior_loss_weight = float(prior_loss_weight)  # DreamBooth batches (ldm.data.dreambooth) only
        self.sample_steps, self.sampler_name, self.guidance_scale = sample_steps, sampler, guidance_scale
        self.sample_spacing = Spacing(sample_spacing).value  # the steps' spacing scripts use by default
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s,
                               zero_terminal_snr)
        self.register_load_state_dict_pre_hook(_float32_schedule_kept)
        self.register_load_state_dict_post_hook(_schedule_from_loaded_buffers)
        self.loss_fn = DiffusionLoss(
            self.scaling,
            timestep_sampler=self.build_level_sampler(timestep_sampler),
            weighting=(instantiate_from_config(loss_weighting, key="model.params.loss_weighting")
                       if loss_weighting is not None else SimpleWeighting()),
            loss_type=loss_type, l_simple_weight=l_simple_weight, original_elbo_weight=original_elbo_weight,
            offset_noise=offset_noise)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:  # a buffer (follows the device), not saved: CompVis keeps it out of checkpoints
            self.register_buffer("logvar", logvar, persistent=False)
        self.learning_rate = 1e-4
        self.restarted_from_ckpt = False
        # LoRA fine-tuning (ldm.lora): the adapters are added when the base weights are loaded (init_from_ckpt)
        self.finetuning = LoraFineTuning(LoraSettings.from_config(lora_config)) if lora_config else None
        # opt-in torch.compile (ldm.compile), applied when a Trainer sets the model up (configure_model)
        self.compile_settings = CompileSettings.parse(compile)
        # noise_seed: training draws made for the global batch from (noise_seed, batch number), the same on every
        # rank (ldm.modules.diffusionmodules.batch_random): a run then does not depend on how its batch is split
        self.noise_seed = noise_seed
        self.batch_random: Optional[GlobalBatchRandom] = None
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # -- schedule ---------------------------------------------------------------------------------
    def register_schedule(self, given_betas, beta_schedule: str, timesteps: int, linear_start: float,
                          linear_end: float, cosine_s: float, zero_terminal_snr: bool = False) -> None:
        betas = (np.asarray(given_betas, dtype=np.float64) if given_betas is not None
                 else make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        buffers = ddpm_buffers(betas, self.v_posterior)
        self.schedule_buffer_names = tuple(buffers)
        for name, value in buffers.items():
            self.register_buffer(name, value)
        # the one schedule object: training's noise levels, the samplers' denoiser and the CompVis DDIM / PLMS shells
        self.noise_schedule = DiscreteSchedule(self.alphas_cumprod)
        if self.original_elbo_weight:  # the VLB weights only when the VLB term is used (infinite under ZTSNR + eps)
            self.register_buffer("lvlb_weights", vlb_weights(
                self.parameterization, self.betas.double(), self.alphas_cumprod.double(),
                self.posterior_variance.double().clamp_min(1e-20)).float(), persistent=False)

    def build_level_sampler(self, config) -> Any:
        """The training noise-level sampler (`timestep_sampler`: timesteps or sigmas, ldm.modules.diffusionmodules
        .loss), uniform timesteps by default; a sampler taking `num_timesteps` is given the schedule's."""
        if config is None:
            return UniformTimesteps(self.num_timesteps)
        key = "model.params.timestep_sampler"
        target = get_obj_from_str(config.get("target") if hasattr(config, "get") else None, key=f"{key}.target")
        takes_t = "num_timesteps" in (accepted_keys(target) or ())
        given = config.get("params") or {}
        extra = {"num_timesteps": self.num_timesteps} if takes_t and "num_timesteps" not in given else None
        return instantiate_from_config(config, key=key, extra_params=extra)

    # -- precision ------------------------------------------------------------------------------
    def frozen_unet_copies(self) -> list[nn.Module]:
        """Other UNet wrappers this model calls but does not train (a distillation teacher, a target network)."""
        return []

    def networks(self) -> list[nn.Module]:
        """The modules holding network weights (the UNet wrapper and its EMA copy); not the schedule buffers."""
        return [self.model] + ([self.model_ema] if self.use_ema else [])

    def set_weights_dtype(self, dtype: torch.dtype) -> "DDPM":
        """Cast the networks' weights to `dtype` (float32, bfloat16 or float16) for sampling.

        The noise schedule, `scale_factor` and the EMA's decay stay float32: samplers read sigmas from
        them, and each network casts its inputs to its own dtype.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"weights dtype must be a floating-point dtype, got {dtype}")
        for module in self.networks():
            module.to(dtype)
        if self.use_ema:
            self.model_ema.decay = self.model_ema.decay.float()
        return self

    # -- compilation ----------------------------------------------------------------------------
    def compile_networks(self, settings: Optional[CompileSettings] = None) -> list[str]:
        """torch.compile the UNet (and the decoder, if asked) in place: `settings`, else the config's `compile`."""
        settings = settings or self.compile_settings
        return compile_networks(self, settings) if settings is not None else []

    def configure_model(self) -> None:
        """Lightning's set-up hook (fit, validate, test, predict): under the FSDP strategy (ldm.parallel) shards the
        UNet and its EMA copy, then compiles what `model.params.compile` names."""
        trainer = attached_trainer(self)
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, FSDP) and not is_sharded(self.model.parameters()):
            shard_diffusion_model(self, strategy)
        self.compile_networks()

    # -- EMA ------------------------------------------------------------------------------------
    @contextmanager
    def ema_scope(self, context: Optional[str] = None):
        """Swap in the EMA weights for the block (validation, sampling)."""
        if not self.use_ema:
            yield
            return
        with self.model_ema.average_parameters(self.model):
            if context is not None:
                logger.debug("%s: switched to EMA weights", context)
            yield

    def on_train_start(self) -> None:
        self._ema_step = self.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # one EMA update per optimizer step (not per micro-batch under gradient accumulation)
        if self.use_ema and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.model_ema(self.model)

    # -- checkpoint -----------------------------------------------------------------------------
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        init_from_ckpt(self.model if only_model else self, path, ignore_keys=ignore_keys,
                       prefix="model." if only_model else None, tolerate_prefixes=("model_ema.",),
                       transform=lambda sd: self.adapt_loaded_state_dict(sd, str(path)))
        if self.finetuning is not None and not self.finetuning.applied:
            self.finetuning.apply(self, path)

    def missing_after_base(self, ckpt, missing: Sequence[str], source: str) -> list[str]:
        """Keys a checkpoint may lack because the base weights supply them (a LoRA run's checkpoints)."""
        if self.finetuning is None or not self.finetuning.applied:
            return list(missing)
        return self.finetuning.missing_after_base(self, ckpt, missing, source)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.finetuning is not None and self.finetuning.applied:  # the adapters only; the base by path and hash
            self.finetuning.prune(self, checkpoint)

    def adapt_loaded_state_dict(self, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Hook for subclasses: a checkpoint's state dict (full key names) made to fit this model before loading."""
        return sd

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.restarted_from_ckpt = True
        if self.finetuning is not None and self.finetuning.applied:  # Lightning loads non-strictly: check here
            own = set(self.state_dict())
            still = self.missing_after_base(checkpoint, sorted(own - set(checkpoint.get("state_dict", {}))),
                                            "the checkpoint to resume")
            if still:
                from ldm.checkpoint import CheckpointError
                raise CheckpointError(f"the checkpoint to resume lacks {len(still)} keys: {still[:3]}")

    # -- diffusion math glue --------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None, return_ids: bool = False,
                    guidance: Optional[torch.Tensor] = None):
        """The network output at (x_t, t) under `cond`; `guidance`: the scale, for a UNet taking it as an input."""
        return self.apply_network(self.model, x_noisy, t, cond, guidance)

    def apply_network(self, net: nn.Module, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None,
                      guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`apply_model` for another UNet wrapper of the same kind (a distillation teacher, a target network)."""
        return net(x_noisy, t, guidance=guidance)

    @property
    def takes_guidance(self) -> bool:
        """Whether the guidance scale is a network input (a guidance-distilled student): sampling then runs one
        forward per step with the scale as input, not classifier-free guidance's two."""
        return self.model.takes_guidance

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, sample_weights: Optional[torch.Tensor] = None):
        """The denoising loss at timesteps t (drawn when None): one call of `self.loss_fn` through the denoiser."""
        return self.loss_fn(self.training_denoiser(), x_start, cond, t=t, noise=noise, logvar=self.logvar,
                            vlb_weights=getattr(self, "lvlb_weights", None),
                            prefix="train" if self.training else "val", sample_weights=sample_weights,
                            rng=self.batch_random)

    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        """`batch[k]` channels-last as datasets give it ((B, H, W, C), (B, T, H, W, C) for clips; (B, H, W) is one
        channel) -> channels first ((B, C, H, W), (B, C, T, H, W)), float, contiguous."""
        x = batch[k]
        if x.dim() == 3:
            x = x[..., None]
        return x.movedim(-1, 1).to(memory_format=torch.contiguous_format).float()  # canonical strides (C = 1 too)

    def shared_step(self, batch: dict):
        return self.p_losses(self.get_input(batch, self.first_stage_key), None, sample_weights=self.item_weights(batch))

    def item_weights(self, batch: dict) -> Optional[torch.Tensor]:
        """The loss weights of a DreamBooth batch's items (instance mean + prior_loss_weight x class mean), else None."""
        weights = prior_weights(batch, self.prior_loss_weight)
        return None if weights is None else weights.to(self.device)

    def global_batch_random(self, stream: int = 0) -> Optional[GlobalBatchRandom]:
        """This training batch's draws for the global batch (with `noise_seed`), else None (each rank's own RNG)."""
        if self.noise_seed is None:
            return None
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        return GlobalBatchRandom(self.noise_seed, training_batches_started(attached_trainer(self)), rank, world,
                                 self.device, stream=stream)

    def training_step(self, batch, batch_idx):
        batch = with_prior(batch)
        self.batch_random = self.global_batch_random()
        try:
            loss, log = self.shared_step(batch)
        finally:
            self.batch_random = None
        if self.log_scalars_now:  # the steps whose values a logger or the progress bar reads
            self.log_dict(log, prog_bar=False, on_step=True, on_epoch=False, batch_size=self._bs(batch))
            self.log("loss", loss.detach(), on_step=True, on_epoch=False, batch_size=self._bs(batch))
            if self.scheduler_config is not None:
                self.log("lr_abs", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False,
                         batch_size=self._bs(batch))
        return loss

    def _bs(self, batch: dict) -> int:
        x = batch[self.first_stage_key] if self.first_stage_key in batch else next(
            v for v in batch.values() if isinstance(v, torch.Tensor))  # cached latents carry no image
        return int(x.shape[0])

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        batch = with_prior(batch)
        _, log = self.shared_step(batch)
        self.log_dict(log, sync_dist=True, batch_size=self._bs(batch))
        if self.use_ema:
            with self.ema_scope():
                _, log_ema = self.shared_step(batch)
            self.log_dict({k + "_ema": v for k, v in log_ema.items()}, sync_dist=True, batch_size=self._bs(batch))

    def trainable_parameters(self) -> list:
        if self.finetuning is not None and not self.finetuning.applied:
            raise ConfigError("model.params.lora_config: LoRA fine-tunes a trained model; give its weights as "
                              "model.params.ckpt_path")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        params = self.trainable_parameters()
        fused = _fused_ok(params)
        opt = torch.optim.AdamW(params, lr=self.learning_rate, fused=fused)
        if fused and params[0].device.type == "cpu":
            opt.register_step_pre_hook(gradients_in_parameter_layout)
        if self.scheduler_config is None:
            return opt
        schedule = instantiate_from_config(self.scheduler_config, key="model.params.scheduler_config")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule.schedule)
        return [opt], [{"scheduler": sched, "interval": "step", "frequency": 1}]

    def training_denoiser(self) -> Denoiser:
        """D(x, sigma) of the UNet being trained, with gradients: the denoiser of sampling (`denoiser`), unquantized."""
        return Denoiser(ApplyModelNetwork(self), self.scaling, self.noise_schedule)

    # -- sampling -------------------------------------------------------------------------------
    def denoiser(self, quantize: bool = False) -> CompVisDenoiser:
        """D(x, sigma) of this model for ldm.sampling, the network told the fractional timestep of sigma."""
        return CompVisDenoiser(self, quantize=quantize)

    @property
    def condition_inputs(self) -> frozenset[ConditionInput]:
        """What `conditioning()` reads: nothing (a pixel-space DDPM is unconditional); LatentDiffusion answers its own."""
        return frozenset()

    @property
    def inpaint_mode(self) -> InpaintMode:
        """How this model inpaints: known-region replacement."""
        return InpaintMode.REPLACE

    def conditioning(self, **inputs: Any) -> Conditioning:
        """No conditioning (see LatentDiffusion.conditioning for the inputs a conditional model reads)."""
        return Conditioning()

    @torch.no_grad()
    def sample(self, cond: Any, batch_size: int, steps: Optional[int] = None, sampler: Optional[str] = None,
               guidance_scale: Optional[float] = None, uncond: Any = None, x_T: Optional[torch.Tensor] = None,
               spacing: str = "uniform", generator: Generator = None, callback=None, guidance_rescale: float = 0.0,
               shape: Optional[tuple[int, ...]] = None, **sampler_options) -> torch.Tensor:
        """Sample latents (VP scale) with a registry sampler and classifier-free guidance: `generation.generate`.

        `generator`: one torch.Generator, or one per image (each image then reproduces from its own seed).
        `shape`: (C, H, W) of a sample, default (channels, image_size, image_size).
        """
        return generation.generate(self, Conditioning(cond, uncond), batch_size, steps=steps, sampler=sampler,
                                   scale=guidance_scale, rescale=guidance_rescale, spacing=spacing,
                                   generator=generator, x_T=x_T, shape=shape, callback=callback, decode=False,
                                   **sampler_options)


# Half-precision copies of the schedule must agree with the float32 one to this tolerance (bf16 keeps 8 bits).
SCHEDULE_RTOL, SCHEDULE_ATOL = 1e-2, 1e-4


def _float32_schedule_kept(module: DDPM, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: schedule buffers stored in fp16/bf16 (half-precision exports) are replaced by this model's
    float32 ones, computed from its config; rounding them would move every timestep's noise level."""
    for name in module.schedule_buffer_names:
        key = prefix + name
        stored = state_dict.get(key)
        if not isinstance(stored, torch.Tensor) or not stored.is_floating_point() or stored.element_size() >= 4:
            continue
        ours = getattr(module, name)
        if stored.shape != ours.shape:
            continue  # another number of timesteps: the checked load reports it
        if not torch.allclose(stored.float().cpu(), ours.float().cpu(), rtol=SCHEDULE_RTOL, atol=SCHEDULE_ATOL):
            logger.warning("checkpoint buffer %s (%s) does not match the schedule of the config; the config's "
                           "float32 schedule is used", key, stored.dtype)
        state_dict[key] = ours.detach().clone()


def _schedule_from_loaded_buffers(module: DDPM, incompatible) -> None:
    """Load hook: a checkpoint whose float32 cumulative alphas differ from the config's rebuilds the schedule object
    from the loaded ones (the samplers and training read them, as CompVis' did)."""
    loaded = module.alphas_cumprod.detach().to(torch.float64)
    kept = module.noise_schedule.alphas_cumprod.to(loaded.device)
    if loaded.shape != kept.shape or not torch.equal(loaded, kept):
        module.noise_schedule = DiscreteSchedule(module.alphas_cumprod)


def _ema_from_loaded_weights(module: DDPM, incompatible) -> None:
    """Load hook: a checkpoint without EMA weights (model_ema.*) starts the EMA from its loaded model weights."""
    shadow = {"model_ema." + s for s in module.model_ema.m_name2s_name.values()}
    missing = [k for k in incompatible.missing_keys if k.startswith("model_ema.")]
    if not shadow <= set(missing):
        return  # EMA weights present (or only partly missing: reported as usual)
    module.model_ema.reset_to(module.model)
    for k in missing:
        incompatible.missing_keys.remove(k)
    logger.warning("checkpoint has no EMA weights (model_ema.*): the EMA starts from the loaded model weights")
