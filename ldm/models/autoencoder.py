"""First-stage autoencoders as Lightning modules: AutoencoderKL, VQModel, VQModelInterface, IdentityFirstStage."""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import ModelKind, init_from_ckpt
from ldm.metrics import reconstruction_metrics
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.vqvae.quantize import VectorQuantizer
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)

# Adam betas of the CompVis first-stage optimizers (generator and discriminator).
FIRST_STAGE_BETAS = (0.5, 0.9)
# VQModel `batch_resize_range`: sizes step by 16; the first batches use the largest (CompVis: global_step <= 4).
RESIZE_MULTIPLE = 16
RESIZE_WARMUP_BATCHES = 4


class _FirstStageBase(pl.LightningModule):
    """Shared glue: input handling, two-optimizer GAN training step, validation metrics, image logging."""

    model_kind = ModelKind.AUTOENCODER  # what the scripts call it (ldm.checkpoint.target_kind)
    progress_bar_keys = ("aeloss", "discloss")  # shown by main.py's bar (see DDPM.progress_bar_keys)

    # The discriminator takes no part in the loss before disc_start, so DDP must allow unused parameters.
    ddp_find_unused_parameters = True

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side (f of the paper's KL-f8, VQ-f4, ...)."""
        return self.encoder.downsampling_factor

    def _init_common(self, ddconfig, lossconfig, embed_dim: int, image_key: str, colorize_nlabels: Optional[int],
                     monitor: Optional[str], decoder_config=None) -> None:
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = self.build_decoder(ddconfig, decoder_config)
        self.loss = instantiate_from_config(lossconfig, key="model.params.lossconfig") if lossconfig else nn.Identity()
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            assert isinstance(colorize_nlabels, int)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.learning_rate = 1e-4  # set by main.py from base_learning_rate
        self.automatic_optimization = False
        self.batches_seen = 0  # CompVis step semantics (one per batch), saved in checkpoints

    @staticmethod
    def build_decoder(ddconfig, decoder_config=None) -> Decoder:
        """The image Decoder of `ddconfig`, or `decoder_config`'s (target + params, e.g. the temporal decoder
        ldm.modules.temporal_ae.VideoDecoder; its params default to ddconfig's)."""
        if decoder_config is None:
            return Decoder(**ddconfig)
        params = {**dict(ddconfig), **dict(decoder_config.get("params", {}) or {})}
        decoder = instantiate_from_config({"target": decoder_config.get("target"), "params": params},
                                          key="model.params.decoder_config")
        if not isinstance(decoder, Decoder):
            raise ConfigError(f"model.params.decoder_config: target {decoder_config.get('target')} built a "
                              f"{type(decoder).__name__}, not a Decoder")
        return decoder

    @property
    def decodes_clips(self) -> bool:
        """Whether the decoder is temporal: `decode(z, timesteps=T)` decodes (b t) latents as clips of T frames."""
        return "timesteps" in getattr(self.decoder, "extra_inputs", ())

    # -- data -----------------------------------------------------------------------------------
    def get_input(self, batch: dict, k: Optional[str] = None) -> torch.Tensor:
        """Batch images (B, H, W, C) in [-1, 1] -> (B, C, H, W) float, contiguous."""
        k = k or self.image_key
        if k not in batch:
            raise KeyError(f"batch has no key '{k}' (image_key); keys: {sorted(batch)}")
        x = batch[k]
        if x.dim() == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def to_weights_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the dtype of the networks' weights (fp32, bf16 or fp16): encode/decode accept any float input."""
        return x.to(self.quant_conv.weight.dtype)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        init_from_ckpt(self, path, ignore_keys=ignore_keys, tolerate_prefixes=("loss.",))

    # -- training -------------------------------------------------------------------------------
    def _ae_parameters(self) -> list:
        raise NotImplementedError

    # whether this training step's scalars will be read: set before each batch by ldm.callbacks.LogWhereRead
    log_scalars_now: bool = True

    def optimizer_steps_next(self) -> int:
        """How many optimizer steps the next training batch takes: 2 once the discriminator trains, else 1."""
        return 2 if hasattr(self.loss, "discriminator") and self.loss.disc_active(self.batches_seen) else 1

    def configure_optimizers(self):
        lr = self.learning_rate
        opt_ae = torch.optim.Adam(self._ae_parameters(), lr=lr * getattr(self, "lr_g_factor", 1.0),
                                  betas=FIRST_STAGE_BETAS)
        opts = [opt_ae]
        if hasattr(self.loss, "discriminator"):
            opts.append(torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=FIRST_STAGE_BETAS))
        scheduler_config = getattr(self, "scheduler_config", None)
        if scheduler_config is None:
            return opts
        schedule = instantiate_from_config(scheduler_config, key="model.params.scheduler_config")
        scheds = [{"scheduler": torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=schedule.schedule), "interval": "step"}
                  for o in opts]
        return opts, scheds

    def _loss_call(self, x, rec, aux, optimizer_idx: int, split: str, step: int,
                   grad_scale: Optional[torch.Tensor] = None):
        raise NotImplementedError

    def _loss_scale(self) -> Optional[torch.Tensor]:
        """The float16 mixed-precision loss scale (a device tensor, read without a host sync), or None."""
        try:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        except RuntimeError:  # not attached to a Trainer
            return None
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler.scale(torch.ones((), device=self.device))

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        opt_ae, opt_disc = (opts if isinstance(opts, (list, tuple)) else (opts, None))
        x = self.get_input(batch)
        rec, aux = self._forward_train(x)
        step = self.batches_seen
        # The discriminator is only trained once it is active (disc_start), as in CompVis.
        train_disc = opt_disc is not None and self.loss.disc_active(step)
        logs = self.log_scalars_now  # where they are read (ldm.callbacks.LogWhereRead)
        aeloss, log_ae = self._loss_call(x, rec, aux, 0, "train", step, grad_scale=self._loss_scale())
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(aeloss)
        opt_ae.step()
        if logs:
            self.log("aeloss", aeloss.detach(), on_step=True, on_epoch=False)
            self.log_dict(log_ae, prog_bar=False, on_step=True, on_epoch=False)
        if train_disc:
            discloss, log_d = self._loss_call(x, rec, aux, 1, "train", step)
            opt_disc.zero_grad(set_to_none=True)
            self.manual_backward(discloss)
            opt_disc.step()
            if logs:
                self.log("discloss", discloss.detach(), on_step=True, on_epoch=False)
                self.log_dict(log_d, prog_bar=False, on_step=True, on_epoch=False)
        scheds = self.lr_schedulers()
        for sch in scheds if isinstance(scheds, list) else [scheds]:
            if sch is not None:
                sch.step()
        self.batches_seen += 1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ldm_batches_seen"] = int(self.batches_seen)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches_seen = int(checkpoint.get("ldm_batches_seen", checkpoint.get("global_step", 0)))

    def validation_step(self, batch, batch_idx):
        x = self.get_input(batch)
        rec, aux = self._forward_eval(x)
        step = self.batches_seen
        aeloss, log_ae = self._loss_call(x, rec, aux, 0, "val", step)
        logs = dict(log_ae)
        if hasattr(self.loss, "discriminator"):
            _, log_d = self._loss_call(x, rec, aux, 1, "val", step)
            logs.update(log_d)
        metrics = reconstruction_metrics(x, self._reconstruct_deterministic(x, rec),
                                         getattr(self.loss, "perceptual_loss", None))
        logs.update({f"val/{k}": v for k, v in metrics.items()})
        logs.update(self._extra_val_logs(aux))
        self.log("val/rec_loss", logs["val/rec_loss"], prog_bar=True, sync_dist=True)
        self.log("val/psnr", logs.pop("val/psnr"), prog_bar=True, sync_dist=True)
        logs.pop("val/rec_loss")
        self.log_dict(logs, sync_dist=True)
        return logs

    def test_step(self, batch, batch_idx):
        x = self.get_input(batch)
        rec = self._reconstruct_deterministic(x, None)
        metrics = reconstruction_metrics(x, rec, getattr(self.loss, "perceptual_loss", None))
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, sync_dist=True)

    def _extra_val_logs(self, aux) -> dict:
        return {}

    def _reconstruct_deterministic(self, x: torch.Tensor, rec: Optional[torch.Tensor]) -> torch.Tensor:
        """The reconstruction the metrics are computed on (KL: from the posterior mode)."""
        return rec if rec is not None else self._forward_eval(x)[0]

    # -- images ---------------------------------------------------------------------------------
    def _extra_images(self, aux) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def log_images(self, batch: dict, only_inputs: bool = False, N: int = 8, **kwargs) -> dict[str, torch.Tensor]:
        """Inputs and reconstructions (plus model-specific extras) for ImageLogger."""
        x = self.get_input(batch)[:N].to(self.device)
        log = {"inputs": x}
        if only_inputs:
            return log
        rec, aux = self._forward_eval(x)
        if x.shape[1] > 3:
            log["inputs"], rec = self.to_rgb(x), self.to_rgb(rec)
        log["reconstructions"] = rec
        log.update(self._extra_images(aux))
        return log

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        assert self.image_key == "segmentation"
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class AutoencoderKL(_FirstStageBase):
    """KL-regularized autoencoder (Rombach et al. 2022, sec. 3.1): encode -> diagonal Gaussian posterior."""

    def __init__(self, ddconfig: dict, lossconfig: Optional[dict], embed_dim: int, ckpt_path: Optional[str] = None,
                 ignore_keys: Sequence[str] = (), image_key: str = "image", colorize_nlabels: Optional[int] = None,
                 monitor: Optional[str] = None, ema_decay: Optional[float] = None, learn_logvar: bool = False,
                 scheduler_config: Optional[dict] = None, decoder_config: Optional[dict] = None):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self._init_common(ddconfig, lossconfig, embed_dim, image_key, colorize_nlabels, monitor, decoder_config)
        self.learn_logvar = learn_logvar
        self.scheduler_config = scheduler_config
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if ema_decay is not None:
            raise NotImplementedError("ema_decay for AutoencoderKL is not provided; leave it unset")
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def _ae_parameters(self) -> list:
        params = (list(self.encoder.parameters()) + list(self.decoder.parameters())
                  + list(self.quant_conv.parameters()) + list(self.post_quant_conv.parameters()))
        if self.learn_logvar and hasattr(self.loss, "logvar"):
            params.append(self.loss.logvar)
        return params

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(self.to_weights_dtype(x))))

    def decode(self, z: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """Images of latents; `timesteps=T` for a temporal decoder decodes (b t) latents as clips of T frames."""
        return self.decoder(self.post_quant_conv(self.to_weights_dtype(z)), **inputs)

    def forward(self, input: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _forward_train(self, x):
        return self(x, sample_posterior=True)

    def _forward_eval(self, x):
        return self(x, sample_posterior=True)

    def _reconstruct_deterministic(self, x, rec):
        return self(x, sample_posterior=False)[0]

    def _loss_call(self, x, rec, posterior, optimizer_idx, split, step, grad_scale=None):
        kw = {"grad_scale": grad_scale} if grad_scale is not None else {}
        return self.loss(x, rec, posterior, optimizer_idx, step, last_layer=self.get_last_layer(), split=split, **kw)

    def _extra_images(self, aux) -> dict[str, torch.Tensor]:
        """Decodings of random latents drawn from N(0, I)."""
        return {"samples": self.decode(torch.randn_like(aux.mode()))}


class VQModel(_FirstStageBase):
    """Vector-quantized autoencoder (VQGAN, Esser et al. 2021) as used for the LDM first stage."""

    def __init__(self, ddconfig: dict, lossconfig: Optional[dict], n_embed: int, embed_dim: int,
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: Optional[int] = None, monitor: Optional[str] = None,
                 batch_resize_range: Optional[Sequence[int]] = None, scheduler_config: Optional[dict] = None,
                 lr_g_factor: float = 1.0, remap: Optional[str] = None, sane_index_shape: bool = False,
                 use_ema: bool = False, beta: float = 0.25, legacy: bool = True, ema_codebook_decay: Optional[float] = None,
                 restart_dead_codes: bool = False, dead_code_steps: int = 100):
        super().__init__()
        if use_ema:
            raise NotImplementedError("use_ema (weight EMA) for VQModel is not provided; use ema_codebook_decay "
                                      "for EMA codebook updates")
        self._init_common(ddconfig, lossconfig, embed_dim, image_key, colorize_nlabels, monitor)
        self.n_embed = n_embed
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, remap=remap, sane_index_shape=sane_index_shape,
                                        legacy=legacy, ema_decay=ema_codebook_decay,
                                        restart_dead_codes=restart_dead_codes, dead_code_steps=dead_code_steps)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.batch_resize_range = batch_resize_range
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def _ae_parameters(self) -> list:
        return (list(self.encoder.parameters()) + list(self.decoder.parameters())
                + [p for p in self.quantize.parameters() if p.requires_grad]
                + list(self.quant_conv.parameters()) + list(self.post_quant_conv.parameters()))

    def encode(self, x: torch.Tensor):
        return self.quantize(self.encode_to_prequant(x))

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(self.to_weights_dtype(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.to_weights_dtype(quant)))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(b, -1), shape=(b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        if return_pred_indices:
            return dec, diff, ind
        return dec, diff

    def get_input(self, batch: dict, k: Optional[str] = None) -> torch.Tensor:
        """The batch images; with `batch_resize_range` [lo, hi] resized (bicubic) to a random multiple of 16 in it,
        the full hi for the first batches (CompVis `VQModel.get_input`), so input and reconstruction share a size."""
        x = super().get_input(batch, k)
        if self.batch_resize_range is None:
            return x
        lo, hi = self.batch_resize_range
        sizes = list(range(lo, hi + RESIZE_MULTIPLE, RESIZE_MULTIPLE))
        size = hi if self.batches_seen <= RESIZE_WARMUP_BATCHES else sizes[int(torch.randint(len(sizes), ()))]
        if size != x.shape[2]:
            x = F.interpolate(x, size=size, mode="bicubic")
        return x.detach()

    def _forward_train(self, x):
        dec, diff, ind = self(x, return_pred_indices=True)
        return dec, (diff, ind)

    def _forward_eval(self, x):
        dec, diff, ind = self(x, return_pred_indices=True)
        return dec, (diff, ind)

    def _loss_call(self, x, rec, aux, optimizer_idx, split, step, grad_scale=None):
        diff, ind = aux
        kw = {"grad_scale": grad_scale} if grad_scale is not None else {}
        return self.loss(diff, x, rec, optimizer_idx, step, last_layer=self.get_last_layer(), split=split,
                         predicted_indices=ind, **kw)

    def _extra_val_logs(self, aux) -> dict:
        _, ind = aux
        counts = torch.bincount(ind.flatten().long(), minlength=self.n_embed).float()
        probs = counts / counts.sum()
        return {"val/perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
                "val/codebook_usage": (counts > 0).float().mean()}


class VQModelInterface(VQModel):
    """VQModel whose `encode` returns pre-quantization latents and `decode` quantizes first (LDM on VQ latents)."""

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        h = self.to_weights_dtype(h)
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, ind) = self.quantize(self.encode(input))
        dec = self.decoder(self.post_quant_conv(quant))
        return (dec, diff, ind) if return_pred_indices else (dec, diff)


class IdentityFirstStage(nn.Module):
    """No first stage: diffusion directly in pixel space (encode/decode are the identity)."""

    model_kind = ModelKind.AUTOENCODER
    downsampling_factor = 1  # pixel space

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
