"""Distillation: the guidance-scale input, guided / progressive / consistency objectives, the consistency sampler,
the students' sampling and cost, the rounds through main.py, and every shipped distillation config."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from _helpers import perturb
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ROOT / "configs" / "distill"


def tiny_mnist(path: Path = ROOT / "configs/ldm/mnist_class_cond.yaml", ae: str | None = None):
    """A class-conditional MNIST-shaped config at tiny width (no text encoder needed)."""
    cfg = load_config(path)
    p = cfg.model.params
    u = p.unet_config.params
    u.model_channels, u.num_head_channels, u.context_dim = 32, 16, 16
    p.cond_stage_config.params.embed_dim = 16
    p.first_stage_config.params.ckpt_path = ae
    return cfg


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny class-conditional LDM, its UNet perturbed away from initialisation, saved with EMA weights."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_mnist().model)
    perturb(model.model, seed=1, scale=0.05)
    model.model_ema.reset_to(model.model)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def student(kind: str, ckpt: Path, **params):
    cfg = tiny_mnist(DISTILL / f"mnist_{kind}.yaml")
    cfg.model.params.ckpt_path = str(ckpt)
    cfg.model.params.update(params)
    return instantiate_from_config(cfg.model)


@pytest.fixture(scope="module")
def guided_ckpt(teacher_ckpt, tmp_path_factory) -> Path:
    """A guided student whose guidance embedding has moved from zero (the teacher of progressive rounds)."""
    from safetensors.torch import save_file
    model = student("guided", teacher_ckpt)
    perturb(model.model.diffusion_model.guidance_embed, seed=2, scale=0.05)
    model.model_ema.reset_to(model.model)
    path = tmp_path_factory.mktemp("guided") / "guided.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def batch(n: int = 6) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"image": torch.rand(n, 32, 32, 1, generator=g) * 2 - 1, "class_label": torch.arange(n) % 10}


def test_guidance_embedding_starts_silent_then_steers_and_is_required():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    kw = dict(image_size=8, in_channels=4, out_channels=4, model_channels=16, attention_resolutions=[1],
              num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, norm_groups=8)
    plain, guided = UNetModel(**kw), UNetModel(**kw, guidance_embed=True)
    perturb(plain, seed=0)
    missing, unexpected = guided.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("guidance_embed" in k for k in missing)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    ref = plain(x, t)
    for w in (1.0, 3.0, 7.5):
        assert torch.equal(guided(x, t, guidance=torch.full((2,), w)), ref)
    perturb(guided.guidance_embed, seed=1)
    assert not torch.allclose(guided(x, t, guidance=torch.full((2,), 1.0)), guided(x, t, guidance=torch.full((2,), 5.0)))
    with pytest.raises(ValueError, match="guidance"):
        guided(x, t)
    with pytest.raises(ValueError, match="guidance"):
        plain(x, t, guidance=torch.ones(2))


def test_teacher_scales_0_and_1_are_unconditional_and_conditional_and_the_student_starts_conditional(teacher_ckpt):
    from ldm.modules.diffusionmodules.distillation import Teacher
    model = student("guided", teacher_ckpt)
    z, c, uc = model.distillation_inputs(batch())
    sigma = torch.full((z.shape[0],), 1.7)
    x = z + sigma.view(-1, 1, 1, 1) * torch.randn_like(z)
    den = model.network_denoiser(model.teacher)
    teacher = Teacher(den)
    cond, uncond = den(x, sigma, c=c), den(x, sigma, c=uc)
    assert not torch.allclose(cond, uncond, atol=1e-4)  # the perturbed teacher tells them apart
    ones, zeros = torch.ones(z.shape[0]), torch.zeros(z.shape[0])
    torch.testing.assert_close(teacher(x, sigma, c, uc, zeros), uncond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher(x, sigma, c, uc, ones), cond, rtol=1e-5, atol=1e-5)
    stud = model.network_denoiser(model.model)
    for w in (0.0, 1.0, 4.0):
        torch.testing.assert_close(stud(x, sigma, c=c, guidance=torch.full((z.shape[0],), w)), cond, rtol=1e-5, atol=1e-5)


V_FROM_EPS = {"parameterization": "v", "teacher_parameterization": "eps"}


@pytest.mark.parametrize("kind,params", [("guided", {}), ("progressive", {}), ("consistency", {}),
                                         ("guided", V_FROM_EPS), ("progressive", V_FROM_EPS)],
                         ids=["guided", "progressive", "consistency", "guided-v", "progressive-v"])
def test_one_round_of_each_method_lowers_the_students_loss_on_a_fixed_batch(kind, params, teacher_ckpt, guided_ckpt):
    model = student(kind, guided_ckpt if kind == "progressive" else teacher_ckpt, **params)
    model.train()
    data = batch()

    def loss() -> torch.Tensor:
        torch.manual_seed(5)  # the same timesteps, noise and scales every time
        return model.shared_step(data)[0]

    before = float(loss())
    # an eps student's x0-space loss is sharp at high noise (at lr 1e-3 it jumps 7x to 240x on the first step); a v
    # student, which must first relearn its output from the eps teacher's weights, decreases steadily at 1e-3
    v = params.get("parameterization") == "v"
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3 if v else 1e-5)
    seen = []
    for _ in range(8):
        opt.zero_grad()
        step_loss = loss()
        step_loss.backward()
        opt.step()
        seen.append(float(step_loss))
    after = float(loss())
    assert after < (0.9 if kind == "progressive" and v else 0.6) * before, (before, after)
    assert max(seen) <= before * (1 + 1e-6), seen
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_a_v_student_of_an_eps_teacher_reads_the_teacher_as_eps(teacher_ckpt):
    """Salimans & Ho's v-parameterised student: its targets come from the teacher read in its own parameterization."""
    from ldm.sampling import CompVisDenoiser
    from ldm.util import ConfigError
    cfg = tiny_mnist()
    cfg.model.params.ckpt_path = str(teacher_ckpt)
    reference = CompVisDenoiser(instantiate_from_config(cfg.model))  # the teacher as an eps LDM samples it
    model = student("guided", teacher_ckpt, **V_FROM_EPS)
    assert model.parameterization == "v"
    z, c, uc = model.distillation_inputs(batch())
    sigma = torch.full((z.shape[0],), 2.5)
    x = z + sigma.view(-1, 1, 1, 1) * torch.randn_like(z)
    with torch.no_grad():
        want = reference(x, sigma, c=c)
        torch.testing.assert_close(model.teacher_fn()(x, sigma, c, uc, torch.ones(z.shape[0])), want,
                                   rtol=1e-5, atol=1e-5)
        # the student reads the same weights as v: it must learn its new output (not the teacher's D at start)
        assert not torch.allclose(model.network_denoiser(model.model)(x, sigma, c=c, guidance=torch.ones(6)), want,
                                  atol=1e-3)
    with pytest.raises(ConfigError, match="teacher_parameterization"):
        student("guided", teacher_ckpt, teacher_parameterization="score")


def test_progressive_target_is_the_two_teacher_steps_one_student_step_reaches():
    from ldm.core.denoiser import DiscreteSchedule
    from ldm.core.algebra import ddim_move
    from ldm.modules.diffusionmodules.distillation import ProgressiveDistillationLoss, Teacher, \
        progressive_grid
    from ldm.modules.diffusionmodules.schedule import make_beta_schedule
    import numpy as np
    sched = DiscreteSchedule(torch.tensor(np.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012))))
    teacher_levels, student_levels = progressive_grid(sched, 4)
    assert len(teacher_levels) == 9 and torch.equal(student_levels, teacher_levels[0::2]) and student_levels[-1] == 0
    from ldm.sampling import get_sigmas
    torch.testing.assert_close(student_levels, get_sigmas(sched, 4, "trailing"))
    den = lambda x, s, c=None: torch.tanh(x) * 0.7 + 0.1 * c  # any deterministic teacher
    seen = {}

    def stud(x, s, c=None):
        seen["x"], seen["s"] = x, s
        return torch.zeros_like(x, requires_grad=True)

    x0, c = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    torch.manual_seed(0)
    _, log = ProgressiveDistillationLoss(sched, "constant")(stud, Teacher(den), x0, c, 4)
    # the target: x0~ such that one DDIM step of the student from (x, s) lands on the teacher's two steps
    x, s = seen["x"], seen["s"]
    i = torch.tensor([int((teacher_levels == v).nonzero()[0]) for v in s])
    mid, nxt = teacher_levels[i + 1], teacher_levels[i + 2]
    x_teacher = ddim_move(ddim_move(x, s, mid, den(x, s, c)), mid, nxt, den(ddim_move(x, s, mid, den(x, s, c)), mid, c))
    torch.manual_seed(0)
    target = torch.zeros_like(x0)
    for k in range(5):
        r = nxt[k] / s[k]
        target[k] = (x_teacher[k] - r * x[k]) / (1 - r)
    student_step = ddim_move(x, s, nxt, target)
    torch.testing.assert_close(student_step, x_teacher, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(log["train/x0_mse"], target.pow(2).mean(), rtol=1e-4, atol=1e-5)


def test_consistency_boundary_holds_exactly_and_the_sampler_with_one_step_is_one_forward(teacher_ckpt):
    from ldm.sampling import get_sigmas, sample
    model = student("consistency", teacher_ckpt)
    perturb(model.model, seed=4)
    model.eval()
    f = model.denoiser()
    z = torch.randn(3, 2, 8, 8)
    cond = {"c": model.get_learned_conditioning(torch.tensor([1, 2, 3])), "guidance": torch.full((3,), 2.0)}
    sigma_min = f.schedule.sigmas[0]
    assert torch.equal(f(z, sigma_min, **cond), z)  # f(x, sigma_min) = x, exactly
    assert not torch.allclose(f(z, f.schedule.sigmas[500], **cond), z)
    calls = []
    orig = model.apply_network
    model.apply_network = lambda *a, **k: calls.append(a[1].shape[0]) or orig(*a, **k)
    for steps in (1, 2, 4):
        calls.clear()
        sig = get_sigmas(f.schedule, steps, "trailing")
        out = sample(f, z, sig, "consistency", extra_args=cond, generator=torch.Generator().manual_seed(0))
        assert len(calls) == steps and calls[0] == 3
        if steps == 1:  # one forward: the consistency function at the top level, from the VE start
            direct = f(z * (1 + sig[0] ** 2).sqrt(), sig[0], **cond)
            torch.testing.assert_close(out, direct, rtol=1e-4, atol=1e-4)  # VE <-> VP scaling rounds


def test_a_guidance_input_student_samples_with_one_forward_per_step_and_is_costed_so(teacher_ckpt):
    from ldm.eval.cost import forwards_per_sample, unet_forward_flops
    from ldm.generation import generate, guidance_as_input
    model = student("guided", teacher_ckpt)
    perturb(model.model.diffusion_model.guidance_embed, seed=5)
    model.eval()
    assert guidance_as_input(model)
    seen = []
    orig = model.apply_network
    model.apply_network = lambda net, x, t, c=None, g=None: seen.append((x.shape[0], g)) or orig(net, x, t, c, g)
    cond = model.conditioning(labels=torch.tensor([3, 4]), guidance=False)
    a = generate(model, cond, 2, steps=4, scale=4.0, generator=torch.Generator().manual_seed(0), decode=False)
    assert len(seen) == 4 and all(n == 2 and torch.equal(g, torch.full((2,), 4.0)) for n, g in seen)
    b = generate(model, cond, 2, steps=4, scale=1.0, generator=torch.Generator().manual_seed(0), decode=False)
    assert not torch.allclose(a, b)  # the scale reaches the network
    assert unet_forward_flops(model.model.diffusion_model, (2, 8, 8), context_tokens=1) > 0  # given the scale input
    assert forwards_per_sample("ddim", 4, 3.0, guidance_doubles=False) == 4
    assert forwards_per_sample("ddim", 4, 3.0) == 8 and forwards_per_sample("consistency", 4, 3.0, False) == 4
    with pytest.raises(ValueError, match="rescale"):
        generate(model, cond, 2, steps=2, scale=3.0, rescale=0.5)


@pytest.mark.parametrize("shell", ["DDIMSampler", "PLMSSampler"])
def test_the_compvis_sampler_shells_give_a_guided_student_its_scale(shell, teacher_ckpt):
    import importlib
    cls = getattr(importlib.import_module(f"ldm.models.diffusion.{shell[:-7].lower()}"), shell)
    model = student("guided", teacher_ckpt)
    perturb(model.model.diffusion_model.guidance_embed, seed=5)
    model.eval()
    seen = []
    orig = model.apply_model
    model.apply_model = lambda x, t, c=None, guidance=None: seen.append((x.shape[0], guidance)) or orig(x, t, c,
                                                                                                   guidance=guidance)
    c = model.get_learned_conditioning(torch.tensor([3, 4]))
    uc = model.get_learned_conditioning(torch.tensor([10, 10]))  # the null class
    out = {}
    for w in (1.0, 4.0):
        seen.clear()
        x_T = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
        out[w], _ = cls(model).sample(S=3, batch_size=2, shape=(2, 8, 8), conditioning=c, x_T=x_T, verbose=False,
                                      unconditional_guidance_scale=w, unconditional_conditioning=uc)
        assert len(seen) >= 3 and all(n == 2 and torch.equal(g, torch.full((2,), w)) for n, g in seen), seen
    assert not torch.allclose(out[1.0], out[4.0])


def test_configuration_errors_name_the_key(teacher_ckpt):
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match="guidance_embed"):
        student("guided", teacher_ckpt, unet_config={"params": {"guidance_embed": False}})
    with pytest.raises(ConfigError, match="rounds"):
        student("progressive", teacher_ckpt, rounds=[16, 4])
    with pytest.raises(ConfigError, match="teacher_takes_guidance"):  # a plain teacher given as a guided one
        student("consistency", teacher_ckpt, teacher_takes_guidance=True)


def _main(args: list[str]) -> int:
    import main as main_mod
    return main_mod.main(args + ["lightning.trainer.enable_progress_bar=false"])


def _tiny_run_args(kind: str, ckpt: Path, tmp_path: Path, ae: Path, name: str) -> list[str]:
    cfg = tiny_mnist(DISTILL / f"mnist_{kind}.yaml", ae=str(ae))
    cfg.model.params.ckpt_path = str(ckpt)
    cfg.data.params.batch_size = 4
    cfg.data.params.train = {"target": "ldm.data.bundled.MNIST5k", "params": {"split": "train", "size": 32}}
    cfg.lightning.trainer.val_check_interval = 1000
    cfg.lightning.trainer.limit_val_batches = 0
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(cfg, path)
    return ["--base", str(path), "-t", "-n", name, "-l", str(tmp_path)]


def _ae(tmp_path: Path) -> Path:
    from safetensors.torch import save_file
    fs = tiny_mnist().model.params.first_stage_config
    ae = instantiate_from_config(fs)
    save_file(ae.state_dict(), str(tmp_path / "ae.safetensors"))
    return tmp_path / "ae.safetensors"


def test_progressive_rounds_through_main_keep_each_round_and_resume_with_the_right_teacher(guided_ckpt, tmp_path):
    from ldm.checkpoint import load_checkpoint
    args = _tiny_run_args("progressive", guided_ckpt, tmp_path, _ae(tmp_path), "prog")
    over = ["model.params.rounds=[4,2]", "model.params.round_steps=2"]
    assert _main(args + over + ["lightning.trainer.max_steps=4"]) == 0
    ckdir = next(tmp_path.glob("*_prog")) / "checkpoints"
    r1, r2 = load_checkpoint(ckdir / "round1_4steps.ckpt")["state_dict"], load_checkpoint(ckdir / "round2_2steps.ckpt")["state_dict"]
    assert int(r1["distill_round"]) == 0 and int(r2["distill_round"]) == 1

    def round1_result(sd_r1):  # the round's student as sampled: its EMA weights
        return {k: sd_r1["model_ema." + k[len("teacher."):].replace(".", "")] for k in r2 if k.startswith("teacher.")}

    expected = round1_result(r1)
    for k, v in expected.items():
        assert torch.equal(r2[k], v), k
    first_teacher = load_checkpoint(guided_ckpt)["state_dict"]
    assert not torch.equal(r1["teacher.diffusion_model.out.2.weight"], r2["teacher.diffusion_model.out.2.weight"])
    assert torch.equal(r1["teacher.diffusion_model.out.2.weight"],
                       first_teacher["model_ema.diffusion_modelout2weight"])
    # resuming from the end of round 1 starts round 2 with round 1's student as the teacher
    assert _main(["-r", str(ckdir / "round1_4steps.ckpt"), "lightning.trainer.max_steps=4"]) == 0
    last = load_checkpoint(sorted(ckdir.glob("last*.ckpt"))[-1])["state_dict"]
    for k, v in expected.items():
        assert torch.equal(last[k], v), k


def test_a_consistency_student_samples_through_sample_diffusion_with_only_steps_and_scale(teacher_ckpt, tmp_path):
    import yaml
    import scripts.sample_diffusion as sd
    args = _tiny_run_args("consistency", teacher_ckpt, tmp_path, _ae(tmp_path), "cd")
    assert _main(args + ["lightning.trainer.max_steps=2"]) == 0
    run = next(tmp_path.glob("*_cd"))
    moved = tmp_path / "elsewhere.safetensors"
    teacher_ckpt.rename(moved)  # the student's checkpoint holds the teacher's weights: its file is not needed
    try:
        assert sd.main(["-r", str(run), "-n", "3", "-c", "2", "--scale", "3", "--batch_size", "3"]) == 0
    finally:
        moved.rename(teacher_ckpt)
    settings = yaml.safe_load(next(run.glob("samples/*/*/sampling_config.yaml")).read_text())
    assert settings["sampler_used"] == "consistency" and settings["steps_used"] == 2


def _teacher_for(cfg, kind: str, tmp_path: Path) -> Path:
    """A checkpoint to start `cfg` from: its own fresh weights, perturbed, as a plain LDM (guided, consistency) or a
    guided student (progressive) would save them."""
    from safetensors.torch import save_file
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.model.params.ckpt_path = None
    model = instantiate_from_config(cfg.model)
    perturb(model.model, seed=6, scale=0.02)
    keep = kind == "progressive"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not k.startswith(("teacher.", "target_model.")) and k != "distill_round"
          and (keep or "guidance_embed" not in k)}
    path = tmp_path / f"{kind}_teacher.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("path", sorted(DISTILL.glob("*.yaml")), ids=lambda p: p.stem)
def test_distillation_configs_build_from_a_teacher_and_take_a_step(path, tmp_path):
    from test_diffusion import shrink_ldm_config, synthetic_batch
    cfg = load_config(path)
    kind = path.stem.split("_")[-1]
    if path.stem.startswith("sd-v1"):
        cfg.model.params.cond_stage_config.params = {}  # a tiny local CLIP text model in place of ViT-L/14
        cfg = shrink_ldm_config(cfg, tmp_path)
    if path.stem.startswith("mnist"):
        cfg = tiny_mnist(path)
    fs = cfg.model.params.first_stage_config
    assert fs.params.get("ckpt_path") is None  # the teacher's checkpoint holds the first stage
    assert OmegaConf.is_missing(cfg.model.params, "ckpt_path")
    cfg.model.params.ckpt_path = str(_teacher_for(cfg, kind, tmp_path))
    model = instantiate_from_config(cfg.model)
    assert model.takes_guidance
    model.train()
    data = synthetic_batch(cfg)
    data["image"] = data["image"][..., : fs.params.ddconfig.in_channels]  # grey MNIST
    loss, log = model.shared_step(data)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
