"""Fine-tuning the autoencoder's decoder in time (Blattmann et al. 2023, "Align your Latents", sec. 3.1.1): a KL
autoencoder whose decoder is a VideoDecoder, started from an image autoencoder, trained on clips with the encoder
frozen, per-frame reconstruction + LPIPS and a patch-wise video discriminator."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from einops import rearrange

from ldm.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_state_dict_checked
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.temporal_ae import VideoDecoder
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

TRAINABLE = ("decoder", "temporal")


class VideoAutoencoderKL(AutoencoderKL):
    """AutoencoderKL over clips (B, T, H, W, C): frames encoded one by one by the frozen encoder, decoded as clips.

    `image_ckpt_path`: the image autoencoder to start from (loaded strictly; the temporal layers are new and start as
    the identity, so the model first decodes as the image decoder). `trainable`: 'decoder' (the whole decoder, as the
    paper fine-tunes it) or 'temporal' (its temporal layers only).
    """

    def __init__(self, *args: Any, image_ckpt_path: Optional[str] = None, trainable: str = "decoder", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.decoder, VideoDecoder):
            raise ConfigError("model.params.decoder_config: a VideoAutoencoderKL needs a temporal decoder "
                              "(ldm.modules.temporal_ae.VideoDecoder)")
        if trainable not in TRAINABLE:
            raise ConfigError(f"model.params.trainable '{trainable}' must be one of {list(TRAINABLE)}")
        self.trainable = trainable
        self.frames: Optional[int] = None  # frames per clip of the batch at hand (set by get_input)
        if image_ckpt_path is not None:
            self.init_from_image_ckpt(image_ckpt_path)
        for p in [*self.encoder.parameters(), *self.quant_conv.parameters(), *self.post_quant_conv.parameters()]:
            p.requires_grad_(False)
        for name, p in self.decoder.named_parameters():
            p.requires_grad_(trainable == "decoder" or self.decoder.is_temporal_key(name))

    def init_from_image_ckpt(self, path: str) -> list[str]:
        """Load an image autoencoder: every key used, every non-temporal weight filled; the temporal ones start as the
        identity. Returns the new keys."""
        sd = extract_state_dict(load_checkpoint(path))
        if any(k.startswith("decoder.") and self.decoder.is_temporal_key(k) for k in sd):
            raise CheckpointError(f"{path}: already holds a temporal decoder; give it as model.params.ckpt_path")

        def is_new(key: str) -> bool:
            return key.startswith("decoder.") and self.decoder.is_temporal_key(key)

        own = set(self.state_dict())
        wrong = sorted(k for k in own - set(sd) if not is_new(k) and not k.startswith("loss."))
        wrong += sorted(k for k in set(sd) - own if not k.startswith("loss."))
        if wrong:
            raise CheckpointError(f"{path}: not the image autoencoder of this model (model.params.image_ckpt_path): "
                                  f"{len(wrong)} keys do not match, e.g. {wrong[:5]}")
        dropped = [k for k in sd if k.startswith("loss.")]
        if dropped:  # the video loss has its own (3-d) discriminator
            logger.info("%s: %d loss.* keys of the image autoencoder not used (its 2-d discriminator)", path,
                        len(dropped))
        sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
        missing, _ = load_state_dict_checked(self, sd, strict=False, source=str(path),
                                             expected_missing=lambda k: is_new(k) or k.startswith("loss."))
        self.decoder.start_as_image_decoder()
        new = [k for k in missing if is_new(k)]
        logger.info("%s: image autoencoder loaded; %d temporal decoder weights are new, started as the identity",
                    path, len(new))
        return new

    # -- clips as frames ------------------------------------------------------------------------------
    def get_input(self, batch: dict, k: Optional[str] = None) -> torch.Tensor:
        """Clips (B, T, H, W, C) -> frames (B T, C, H, W); the clip length is kept for the decoder and the loss."""
        k = k or self.image_key
        if k not in batch:
            raise KeyError(f"batch has no key '{k}' (image_key); keys: {sorted(batch)}")
        x = batch[k]
        if x.dim() != 5:
            raise ValueError(f"batch['{k}'] has shape {tuple(x.shape)}; a VideoAutoencoderKL takes clips (B, T, H, W, C)")
        self.frames = int(x.shape[1])
        return rearrange(x, "b t h w c -> (b t) c h w").to(memory_format=torch.contiguous_format).float()

    def _ae_parameters(self) -> list:
        return [p for p in self.decoder.parameters() if p.requires_grad] + (
            [self.loss.logvar] if self.learn_logvar and hasattr(self.loss, "logvar") else [])

    def forward(self, input: torch.Tensor, sample_posterior: bool = True):
        with torch.no_grad():  # the encoder is frozen
            posterior = self.encode(input)
            z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z, timesteps=self.frames), posterior

    def _loss_call(self, x, rec, posterior, optimizer_idx, split, step, grad_scale=None):
        kw = {"grad_scale": grad_scale} if grad_scale is not None else {}
        return self.loss(x, rec, posterior, optimizer_idx, step, last_layer=self.get_last_layer(), split=split,
                         timesteps=self.frames, **kw)

    def _extra_images(self, aux) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def log_images(self, batch: dict, only_inputs: bool = False, N: int = 4, **kwargs) -> dict[str, torch.Tensor]:
        """Input clips and their reconstructions as frame strips (a row per clip)."""
        x = self.get_input({self.image_key: batch[self.image_key][:N]})
        strips = {"inputs": x}
        if not only_inputs:
            strips["reconstructions"] = self(x.to(self.device), sample_posterior=False)[0]
        t = self.frames
        return {k: rearrange(v, "(b t) c h w -> b c h (t w)", t=t) for k, v in strips.items()}


def flicker(clips: torch.Tensor) -> float:
    """Mean absolute frame-to-frame change of (B, C, T, H, W) clips: the temporal decoder's benchmark figure (lower
    is steadier; compare with the inputs' own)."""
    return float((clips[:, :, 1:] - clips[:, :, :-1]).abs().mean())
