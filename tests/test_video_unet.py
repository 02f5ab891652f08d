"""The video UNet (Align your Latents' temporal layers, sgm's VideoUNet layout) against the image UNet it extends."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.temporal_mix import AlphaBlender
from ldm.modules.diffusionmodules.util import to_channels_last
from ldm.modules.diffusionmodules.video_model import VideoUNet
from ldm.modules.kernel_backend import CpuKernels, use_cpu_kernels

# a tiny network with every temporal part Stable Video Diffusion's config switches on (sequential vector input,
# linear projections, the extra feed-forward in, spatial context for the temporal cross-attention)
SHAPE = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, attention_resolutions=[2],
             channel_mult=[1, 2], num_head_channels=16, context_dim=24, transformer_depth=1,
             use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=12)
VIDEO = dict(extra_ff_mix_layer=True, use_spatial_context=True, video_kernel_size=[3, 1, 1])
B, T, HW = 2, 3, 8


def perturbed(net: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight moved off its initialisation (zeroed output layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def video_unet(**kw) -> VideoUNet:
    torch.manual_seed(0)
    return VideoUNet(**SHAPE, **{**VIDEO, **kw})


def image_twin(video: VideoUNet) -> UNetModel:
    """The image UNet of the same shape holding the video UNet's spatial weights."""
    image = UNetModel(image_size=HW, **SHAPE, use_spatial_transformer=True, legacy=False)
    image.load_state_dict({k: v for k, v in video.state_dict().items() if not video.is_temporal_key(k)})
    return image


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, T, HW, HW, generator=g)
    t = torch.tensor([17.0, 640.0])
    context = torch.randn(B, 5, 24, generator=g)
    y = torch.randn(B, 12, generator=g)
    return x, t, context, y


def per_frame(x, t, context, y):
    """The (b t) batch the image UNet sees for clips x."""
    return (x.movedim(2, 1).reshape(B * T, *x.shape[1:2], HW, HW), t.repeat_interleave(T),
            context.repeat_interleave(T, 0), y.repeat_interleave(T, 0))


def frames_of(out: torch.Tensor) -> torch.Tensor:
    return out.movedim(2, 1).reshape(B * T, out.shape[1], HW, HW)


@torch.no_grad()
def test_alpha_one_reproduces_the_image_unet_exactly():
    video = perturbed(video_unet(merge_strategy="fixed", merge_factor=1.0))
    image = UNetModel(image_size=HW, **SHAPE, use_spatial_transformer=True, legacy=False)
    missing, unexpected = video.load_state_dict(perturbed(image, seed=3).state_dict(), strict=False)
    assert not unexpected and missing and all(video.is_temporal_key(k) for k in missing)
    x, t, c, y = inputs()
    out = video(x, t, context=c, y=y)
    assert out.shape == x.shape
    assert torch.equal(frames_of(out), image(*per_frame(x, t, c, y)[:1], per_frame(x, t, c, y)[1],
                                             context=per_frame(x, t, c, y)[2], y=per_frame(x, t, c, y)[3]))


@torch.no_grad()
def test_images_in_a_learned_with_images_batch_get_the_image_unet():
    video = perturbed(video_unet(merge_strategy="learned_with_images", merge_factor=0.0))
    image = image_twin(video)
    x, t, c, y = inputs()
    xf, tf, cf, yf = per_frame(x, t, c, y)
    ones = torch.ones(B, T)
    out = video(xf, tf, context=cf, y=yf, num_video_frames=T, image_only_indicator=ones)
    assert torch.equal(out, image(xf, tf, context=cf, y=yf))
    # as videos (the default indicator: zeros) the temporal layers mix in
    assert not torch.allclose(video(xf, tf, context=cf, y=yf, num_video_frames=T), out, atol=1e-4)


@torch.no_grad()
def test_frames_see_each_other_only_through_the_temporal_layers():
    video = perturbed(video_unet(merge_strategy="learned", merge_factor=0.0))
    image = image_twin(video)
    x, t, c, y = inputs()
    x2 = x.clone()
    x2[:, :, 0] += 1.0  # change frame 0 of each clip
    frame1 = lambda out: out[:, :, 1]  # noqa: E731
    assert (frame1(video(x2, t, context=c, y=y)) - frame1(video(x, t, context=c, y=y))).abs().max() > 1e-3
    image_out = lambda v: frames_of_image(image, v, t, c, y)  # noqa: E731
    assert torch.equal(image_out(x2)[:, :, 1], image_out(x)[:, :, 1])
    # a clip never sees another clip
    x3 = x.clone()
    x3[0] += 1.0
    assert torch.equal(video(x3, t, context=c, y=y)[1], video(x, t, context=c, y=y)[1])


def frames_of_image(image, x, t, c, y):
    xf, tf, cf, yf = per_frame(x, t, c, y)
    return image(xf, tf, context=cf, y=yf).reshape(B, T, 4, HW, HW).movedim(1, 2)


@torch.no_grad()
def test_start_as_image_model_gives_the_image_function_for_any_alpha():
    video = perturbed(video_unet(merge_strategy="learned", merge_factor=0.3)).start_as_image_model()
    image = image_twin(video)
    x, t, c, y = inputs()
    out = video(x, t, context=c, y=y)
    ref = frames_of_image(image, x, t, c, y)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    # and the temporal layers still train from there: their output layers get gradient
    with torch.enable_grad():
        video.train()
        video(x, t, context=c, y=y).square().mean().backward()
    last = video.input_blocks[1][0].time_stack.out_layers[-1].weight
    assert last.grad is not None and last.grad.abs().sum() > 0


@torch.no_grad()
def test_clip_input_equals_frames_input():
    video = perturbed(video_unet(merge_strategy="learned_with_images", merge_factor=0.0))
    x, t, c, y = inputs()
    ind = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    clips = video(x, t, context=c, y=y, image_only_indicator=ind)
    xf, tf, cf, yf = per_frame(x, t, c, y)
    frames = video(xf, tf, context=cf, y=yf, num_video_frames=T, image_only_indicator=ind)
    assert torch.equal(frames_of(clips), frames)


def test_sgm_key_names_and_shapes():
    sd = video_unet(merge_strategy="learned_with_images").state_dict()
    assert sd["input_blocks.1.0.time_stack.in_layers.2.weight"].shape == (32, 32, 3, 1, 1)
    assert sd["input_blocks.1.0.time_stack.out_layers.3.weight"].shape == (32, 32, 3, 1, 1)
    assert sd["input_blocks.1.0.time_stack.emb_layers.1.weight"].shape == (32, 128)
    assert sd["input_blocks.1.0.time_mixer.mix_factor"].shape == (1,)
    for key in ("time_stack.0.attn1.to_q.weight", "time_stack.0.attn2.to_k.weight", "time_stack.0.ff_in.net.0.proj.weight",
                "time_stack.0.norm_in.weight", "time_stack.0.ff.net.2.weight", "time_stack.0.norm3.bias",
                "time_pos_embed.0.weight", "time_pos_embed.2.bias", "time_mixer.mix_factor"):
        assert f"input_blocks.3.1.{key}" in sd, key
    assert sd["input_blocks.3.1.time_stack.0.attn2.to_k.weight"].shape == (64, 24)  # spatial context for time
    assert "middle_block.1.time_stack.0.attn1.to_v.weight" in sd and "output_blocks.0.0.time_mixer.mix_factor" in sd
    fixed = video_unet(merge_strategy="fixed", merge_factor=0.25)
    assert "input_blocks.1.0.time_mixer.mix_factor" in fixed.state_dict()  # a buffer, saved as sgm saves it
    assert not any("mix_factor" in n for n, _ in fixed.named_parameters())


def test_refusals_name_the_culprit():
    video = video_unet(merge_strategy="learned_with_images")
    x, t, c, y = inputs()
    with pytest.raises(TypeError, match="num_frames"):
        video(x, t, context=c, y=y, num_frames=T)
    with pytest.raises(ValueError, match="num_video_frames 4"):
        video(x, t, context=c, y=y, num_video_frames=4)
    xf, tf, cf, yf = per_frame(x, t, c, y)
    with pytest.raises(ValueError, match="num_video_frames is needed"):
        video(xf, tf, context=cf, y=yf)
    with pytest.raises(ValueError, match="whole clips"):
        video(xf[:5], tf[:5], context=cf[:5], y=yf[:5], num_video_frames=T)
    with pytest.raises(ValueError, match="image_only_indicator of shape"):
        video(x, t, context=c, y=y, image_only_indicator=torch.zeros(B, T + 1))
    with pytest.raises(ValueError, match="3 items for 2 clips"):
        video(x, t, context=c[:1].expand(3, -1, -1), y=y)
    with pytest.raises(ValueError, match="merge_strategy 'learnt'"):
        video_unet(merge_strategy="learnt")
    with pytest.raises(NotImplementedError, match="time_downup"):
        video_unet(time_downup=True)
    with pytest.raises(ValueError, match="needs image_only_indicator"):
        AlphaBlender(0.0, "learned_with_images")(torch.zeros(2, 1, 1), torch.zeros(2, 1, 1))


def test_channels_last_holds_2d_and_3d_convolutions():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv3d(4, 4, (3, 1, 1)))
    to_channels_last(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert net[1].weight.is_contiguous(memory_format=torch.channels_last_3d)
    video = video_unet()
    conv3d = video.input_blocks[1][0].time_stack.in_layers[2].weight
    assert conv3d.dim() == 5 and conv3d.is_contiguous(memory_format=torch.channels_last_3d)


@torch.no_grad()
def test_cpu_kernels_swap_into_the_temporal_layers_and_back_unchanged():
    video = perturbed(video_unet(merge_strategy="learned", merge_factor=0.0))
    x, t, c, y = inputs()
    use_cpu_kernels(video, CpuKernels.off())
    ref = video(x, t, context=c, y=y)
    counts = use_cpu_kernels(video, CpuKernels(attention="sdpa", fused_ops=True))
    image = use_cpu_kernels(image_twin(video), CpuKernels.off())  # what it had swapped in when built
    # the temporal res-blocks' two norms each and the temporal transformers' GEGLUs (ff_in and ff) are swapped too
    assert counts["norm"] == image["norm"] + 2 * 8 and counts["gelu_gate"] == 3 * image["gelu_gate"]
    assert torch.allclose(video(x, t, context=c, y=y), ref, atol=1e-4, rtol=1e-4)
