"""Generation has one home: every task reaches `ldm.generation.generate`, and what a task is given (spacing, guidance
rescale) reaches the sampler; each model kind answers what it is conditioned on."""
from __future__ import annotations

import pytest
import torch

from _helpers import perturb, tiny_sd2
from ldm import generation
from ldm.modules.model_inputs import ConditionInput, InpaintMode
from ldm.sampling import Spacing
from ldm.util import instantiate_from_config


def text_states(texts) -> torch.Tensor:
    """A stand-in text encoder: token states (B, 3, 16) from each prompt's length."""
    return torch.stack([torch.full((3, 16), len(t) / 10) for t in texts])


@pytest.fixture(scope="module")
def models() -> dict:
    """Tiny SD2 text-to-image, inpainting and x4 upscaling models, UNets perturbed, text by `text_states`."""
    out = {}
    for seed, name in enumerate(("v2-inference", "v2-inpainting-inference", "x4-upscaling")):
        torch.manual_seed(seed)
        model = instantiate_from_config(tiny_sd2(name).model).eval()
        perturb(model.model, seed=seed + 1)
        model.get_learned_conditioning = text_states
        out[name] = model
    return out


def _image(n: int = 1, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _mask(n: int = 1, side: int = 32) -> torch.Tensor:
    mask = torch.zeros(n, 1, side, side)
    mask[..., side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1
    return mask


# every task, run at the smallest size; kwargs go to the task's own generation options
def _txt2img(m, **kw):
    return generation.sample_prompts(m["v2-inference"], ["a square"], steps=2, sampler="ddim", scale=3.0, seed=0,
                                     shape=(4, 4, 4), **kw)


def _img2img(m, **kw):
    return generation.img2img(m["v2-inference"], _image(), ["a square"], strength=0.75, steps=4, sampler="ddim",
                              scale=3.0, seed=0, **kw)


def _inpaint_replace(m, **kw):
    from ldm.inpainting import inpaint
    return inpaint(m["v2-inference"], _image(), _mask(), ["a square"], steps=3, scale=3.0, seed=0, **kw)


def _inpaint_model(m, **kw):
    from ldm.inpainting import inpaint
    return inpaint(m["v2-inpainting-inference"], _image(), _mask(), ["a square"], steps=3, scale=3.0, seed=0, **kw)


def _upscale(m, **kw):
    from ldm.superres import upscale
    return upscale(m["x4-upscaling"], _image(side=8), ["a square"], steps=3, scale=3.0, noise_level=20, seed=0, **kw)


def _ddpm_sample(m):
    model = m["v2-inference"]
    cond = model.conditioning(prompts=["a square"])
    return model.sample(cond.cond, 1, steps=2, uncond=cond.uncond, guidance_scale=3.0, shape=(4, 4, 4))


def _evaluation(m):
    from ldm.eval.generate import conditions_for, generate
    model = m["v2-inference"]
    conditions = conditions_for(model, 2, prompts=["a square", "a circle"])
    return list(generate(model, 2, conditions, sampler="ddim", steps=2, scale=3.0, seed=0, batch_size=2))


def _notebook_settings(m):
    from ldm.notebook import sample_settings
    return sample_settings(m["v2-inference"], ["a square"], [{"sampler": "ddim", "steps": 2, "scale": 3.0}])


def _notebook_trajectory(m):
    from ldm.notebook import trajectory
    return trajectory(m["v2-inference"], "a square", steps=2)


def _ddim_shell_decode(m):
    from ldm.models.diffusion.ddim import DDIMSampler
    model = m["v2-inference"]
    shell = DDIMSampler(model)
    shell.make_schedule(4, verbose=False)
    cond = model.conditioning(prompts=["a square"])
    return shell.decode(torch.randn(1, 4, 4, 4), cond.cond, t_start=2, unconditional_guidance_scale=3.0,
                        unconditional_conditioning=cond.uncond)


TASKS = {"txt2img": _txt2img, "img2img": _img2img, "inpaint (known region)": _inpaint_replace,
         "inpaint (inpainting model)": _inpaint_model, "super-resolution tiles": _upscale,
         "DDPM.sample": _ddpm_sample, "evaluation": _evaluation, "notebook settings grid": _notebook_settings,
         "notebook trajectory": _notebook_trajectory, "DDIM shell decode": _ddim_shell_decode}


class Reached(Exception):
    """Raised by the stand-in `generate`: the task got there."""


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_goes_through_generate(models, monkeypatch, task):
    calls = []

    def stand_in(model, conditioning=None, n=None, **options):
        calls.append(options)
        raise Reached

    monkeypatch.setattr(generation, "generate", stand_in)
    with pytest.raises(Reached):
        TASKS[task](models)
    assert len(calls) == 1


REACH = {"img2img": _img2img, "inpaint (known region)": _inpaint_replace,
         "inpaint (inpainting model)": _inpaint_model, "super-resolution tiles": _upscale, "txt2img": _txt2img}


@pytest.mark.parametrize("task", sorted(REACH))
def test_every_spacing_and_guidance_rescale_reach_the_sampler(models, monkeypatch, task):
    """The task's spacing reaches get_sigmas and its rescale the guidance wrapper, and rescale changes the images."""
    seen: dict[str, list] = {"spacing": [], "rescale": []}
    real_sigmas, real_cfg = generation.get_sigmas, generation.CFGDenoiser

    def sigmas(schedule, steps, spacing=Spacing.UNIFORM):
        seen["spacing"].append(Spacing(spacing))
        return real_sigmas(schedule, steps, spacing)

    class Guidance(real_cfg):
        def __init__(self, denoiser, scale=1.0, rescale=0.0):
            seen["rescale"].append(rescale)
            super().__init__(denoiser, scale=scale, rescale=rescale)

    monkeypatch.setattr(generation, "get_sigmas", sigmas)
    monkeypatch.setattr(generation, "CFGDenoiser", Guidance)
    outputs = {}
    for spacing in Spacing:
        outputs[spacing] = REACH[task](models, spacing=spacing, rescale=0.7)
        assert torch.isfinite(outputs[spacing]).all()
    assert seen["spacing"] == list(Spacing) and seen["rescale"] == [0.7] * len(Spacing)
    plain = REACH[task](models, spacing=Spacing.TRAILING, rescale=0.0)
    assert (plain - outputs[Spacing.TRAILING]).abs().max() > 1e-4  # rescale acts
    assert (outputs[Spacing.UNIFORM] - outputs[Spacing.TRAILING]).abs().max() > 1e-4  # so does the spacing


def test_each_model_kind_answers_what_it_reads(models):
    t2i, inp, x4 = models["v2-inference"], models["v2-inpainting-inference"], models["x4-upscaling"]
    assert t2i.condition_inputs == {ConditionInput.PROMPTS} and t2i.inpaint_mode is InpaintMode.REPLACE
    assert inp.condition_inputs == {ConditionInput.PROMPTS, ConditionInput.MASK}
    assert inp.inpaint_mode is InpaintMode.MODEL
    assert x4.condition_inputs == {ConditionInput.PROMPTS, ConditionInput.LOW_RES, ConditionInput.NOISE_LEVEL}
    # guidance nulls the text only: the mask inputs, the low-resolution image and its level are shared
    c = inp.conditioning(prompts=["a", "b"], image=_image(2), mask=_mask(2))
    assert c.uncond["c_concat"][0] is c.cond["c_concat"][0]
    assert torch.equal(c.uncond["c_crossattn"][0], text_states(["", ""]))
    c = x4.conditioning(prompts=["a"], low_res=_image(side=8), noise_level=20, generator=torch.Generator())
    assert c.uncond["c_adm"] is c.cond["c_adm"] and (c.cond["c_adm"] == 20).all()
    assert t2i.conditioning(prompts=["a"], guidance=False).uncond is None
    with pytest.raises(ValueError, match="noise_level"):  # the x4 upscaler needs its augmentation level
        x4.conditioning(prompts=["a"], low_res=_image(side=8))
    with pytest.raises(ValueError, match="give mask|the image to fill"):
        inp.conditioning(prompts=["a"])


def test_conditioning_key_is_an_enum_that_still_compares_as_the_string(models):
    from ldm.models.diffusion.ddpm import ConditioningKey
    key = models["x4-upscaling"].model.conditioning_key
    assert key is ConditioningKey.HYBRID_ADM and key == "hybrid-adm" and key.reads_text and key.concatenates
    with pytest.raises(ValueError, match="conditioning_key 'hybird' unknown"):
        ConditioningKey.parse("hybird")
