"""The temporal decoder (Align your Latents sec. 3.1.1, sgm's VideoDecoder layout): it starts as the image decoder,
mixes frames once trained, trains with the encoder frozen and a video discriminator, and the video LDM decodes with it."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError
from ldm.models.video_autoencoder import flicker
from ldm.modules.diffusionmodules.model import Decoder
from ldm.modules.temporal_ae import VideoDecoder
from ldm.util import ConfigError, instantiate_from_config

from _helpers import perturb

DD = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2], num_res_blocks=1,
          attn_resolutions=[], dropout=0.0, norm_groups=4)
LOSS = {"target": "ldm.modules.losses.contperceptual.VideoLPIPSWithDiscriminator",
        "params": {"disc_start": 0, "kl_weight": 1e-6, "perceptual_weight": 0.0, "pixel_loss": "l2",
                   "disc_num_layers": 2, "disc_ndf": 8}}
VIDEO_DECODER = {"target": "ldm.modules.temporal_ae.VideoDecoder",
                 "params": {"video_kernel_size": [3, 1, 1], "merge_strategy": "learned", "alpha": 0.0}}


def clips(n=2, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, t, 32, 32, 3, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def image_ae(tmp_path_factory):
    torch.manual_seed(0)
    ae = instantiate_from_config(OmegaConf.create({"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "ddconfig": DD, "embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"}}}))
    perturb(ae, seed=1)
    path = tmp_path_factory.mktemp("tae") / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(path))
    return ae.eval(), str(path)


def video_ae(path, **over):
    torch.manual_seed(0)
    params = {"ddconfig": DD, "embed_dim": 4, "lossconfig": LOSS, "decoder_config": VIDEO_DECODER,
              "image_key": "video", "image_ckpt_path": path, **over}
    return instantiate_from_config(OmegaConf.create({"target": "ldm.models.video_autoencoder.VideoAutoencoderKL",
                                                     "params": params}))


def test_sgm_key_names_and_the_image_decoder_without_frames():
    dec = VideoDecoder(**DD, video_kernel_size=[3, 1, 1])
    sd = dec.state_dict()
    assert sd["up.0.block.0.time_stack.in_layers.2.weight"].shape == (8, 8, 3, 1, 1)
    assert "up.0.block.0.mix_factor" in sd and "mid.block_1.time_stack.out_layers.3.bias" in sd
    assert sd["conv_out.time_mix_conv.weight"].shape == (3, 3, 3, 1, 1)
    assert not any("emb_layers" in k for k in sd)
    image = Decoder(**DD)
    missing, unexpected = dec.load_state_dict(image.state_dict(), strict=False)
    assert not unexpected and all(dec.is_temporal_key(k) for k in missing)
    z = torch.randn(4, 4, 16, 16)
    with torch.no_grad():
        perturb(image, seed=2)
        dec.load_state_dict(image.state_dict(), strict=False)
        assert torch.equal(dec(z), image(z))  # no timesteps: single images, the spatial layers only
    with pytest.raises(TypeError, match="unknown input timesteps"):
        image(z, timesteps=2)
    with pytest.raises(NotImplementedError, match="time_mode 'all'"):
        VideoDecoder(**DD, time_mode="all")


@torch.no_grad()
def test_starts_as_the_image_decoder_and_mixes_frames_once_trained(image_ae):
    ae, path = image_ae
    video = video_ae(path).eval()
    x = clips()
    frames = x.flatten(0, 1).permute(0, 3, 1, 2)
    z = ae.encode(frames).mode()
    ref = ae.decode(z)
    out = video.decode(z, timesteps=4)
    assert torch.allclose(out, ref, atol=1e-5)
    perturb(torch.nn.ModuleList([m for n, m in video.decoder.named_modules() if n.endswith(("time_stack", "time_mix_conv"))]),
            seed=4)
    z2 = z.clone()
    z2[0] += 1.0  # frame 0 of clip 0
    a, b = video.decode(z, timesteps=4), video.decode(z2, timesteps=4)
    assert (a[1] - b[1]).abs().max() > 1e-4  # frame 1 of the same clip sees it
    assert torch.equal(a[4:], b[4:])  # the other clip does not


def test_trains_the_decoder_with_the_encoder_frozen_and_a_video_discriminator(image_ae):
    ae, path = image_ae
    video = video_ae(path)
    frozen = {n: p.detach().clone() for n, p in video.named_parameters() if n.startswith(("encoder.", "quant_conv."))}
    assert frozen and not any(p.requires_grad for n, p in video.named_parameters() if n in frozen)
    from ldm.modules.losses.discriminator import NLayerDiscriminator3D
    assert isinstance(video.loss.discriminator, NLayerDiscriminator3D)
    opt_ae, opt_d = video.configure_optimizers()
    dec_before = video.decoder.conv_out.time_mix_conv.weight.detach().clone()
    video.train()
    for step in range(2):
        x = video.get_input({"video": clips(seed=step)})
        assert video.frames == 4 and x.shape == (8, 3, 32, 32)
        rec, post = video(x)
        loss, log = video._loss_call(x, rec, post, 0, "train", step)
        opt_ae.zero_grad()
        loss.backward()
        opt_ae.step()
        d_loss, _ = video._loss_call(x, rec, post, 1, "train", step)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
    assert all(torch.equal(p, frozen[n]) for n, p in video.named_parameters() if n in frozen)
    assert not torch.equal(dec_before, video.decoder.conv_out.time_mix_conv.weight)
    assert video.log_images({"video": clips()}, N=2)["reconstructions"].shape == (2, 3, 32, 4 * 32)
    assert flicker(torch.zeros(1, 3, 4, 8, 8)) == 0.0


def test_refusals(image_ae, tmp_path):
    _, path = image_ae
    video = video_ae(path)
    video_path = str(tmp_path / "video_ae.safetensors")
    save_file({k: v.contiguous() for k, v in video.state_dict().items() if not k.startswith("loss.")}, video_path)
    with pytest.raises((CheckpointError, ConfigError), match="already holds a temporal decoder"):
        video_ae(video_path)
    with pytest.raises(ConfigError, match="needs a temporal decoder"):
        video_ae(path, decoder_config=None)
    with pytest.raises(ValueError, match="takes clips"):
        video.get_input({"video": torch.zeros(2, 32, 32, 3)})


@torch.no_grad()
def test_the_video_ldm_decodes_clips_in_chunks_with_a_temporal_decoder(image_ae):
    ae, path = image_ae
    video = video_ae(path).eval()
    perturb(torch.nn.ModuleList([m for n, m in video.decoder.named_modules() if n.endswith("time_stack")]), seed=6)

    class Holder(torch.nn.Module):  # what VideoLatentDiffusion.decode_first_stage reads
        scale_factor = 1.0
        frame_chunk = 2

        def __init__(self):
            super().__init__()
            self.first_stage_model = video

    from ldm.models.diffusion.video import VideoLatentDiffusion
    z = torch.randn(2, 4, 4, 16, 16)
    out = VideoLatentDiffusion.decode_first_stage(Holder(), z)
    assert out.shape == (2, 3, 4, 32, 32)
    # chunks of 2 frames: frames 0-1 and 2-3 of each clip are decoded as clips of their own
    first = video.decode(z[1, :, :2].movedim(1, 0), timesteps=2)
    assert torch.allclose(out[1, :, :2].movedim(1, 0), first, atol=1e-6)
