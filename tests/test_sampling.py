"""Samplers against exact answers: for Gaussian data the optimal denoiser and the probability-flow ODE are closed-form."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.sampling import (SAMPLERS, STOCHASTIC, CFGDenoiser, Denoiser, DiscreteSchedule, MaskedDenoiser,
                          ThresholdedDenoiser, get_sampler, get_sigmas, img2img_start, karras_sigmas, scaling_for)
from ldm.core.spacing import compvis_ddim_timesteps


def vp_denoiser(net, ac, parameterization):
    return Denoiser(net, scaling_for(parameterization), DiscreteSchedule(ac))

# data ~ N(M, S^2) per dimension
M = torch.linspace(-1, 1, 8, dtype=torch.float64) * 0.5
S = torch.linspace(0.3, 1.5, 8, dtype=torch.float64)


def gauss_denoiser(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
    """E[x0 | x0 + sigma n = x] for x0 ~ N(M, S^2)."""
    sg = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return M + S ** 2 / (S ** 2 + sg ** 2) * (x - M)


def ode_solution(x: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """Probability-flow ODE from level s0 to s1 for Gaussian data."""
    return M + torch.sqrt(S ** 2 + s1 ** 2) / torch.sqrt(S ** 2 + s0 ** 2) * (x - M)


def _err(name: str, n: int, sigmas_fn, **kw) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64) * 10
    sig = sigmas_fn(n)
    out = SAMPLERS[name](gauss_denoiser, x.clone(), sig, disable=True, **kw)
    return float((out - ode_solution(x, float(sig[0]), float(sig[-1]))).abs().max())


def _karras(n):
    return karras_sigmas(n + 1, 0.1, 10.0)


def _slope(name, sigmas_fn, n=32, **kw):
    return math.log2(_err(name, n, sigmas_fn, **kw) / _err(name, 2 * n, sigmas_fn, **kw))


@pytest.mark.parametrize("name,order,kw", [
    ("euler", 1, {}), ("ddim", 1, {}), ("dpm_solver_1", 1, {}), ("heun", 2, {}), ("dpmpp_2m", 2, {}),
    ("unipc", 3, {"lower_order_final": False}), ("unipc", 2, {}), ("plms", 2, {}),
])
def test_deterministic_samplers_converge_with_their_order(name, order, kw):
    """Error slope vs step count on Karras sigmas. PLMS: 2nd order on this non-uniform grid (4th on a uniform one).
    UniPC-2 with its corrector is 3rd order; lowering the order on the last steps (its default, as the reference and
    diffusers) leaves an uncorrected first-order final step, so 2nd order overall."""
    slope = _slope(name, _karras, **kw)
    assert abs(slope - order) < 0.15, (name, slope)
    assert _err(name, 64, _karras, **kw) < 0.06


def test_plms_is_fourth_order_on_uniform_steps():
    slope = _slope("plms", lambda n: torch.linspace(10.0, 0.1, n + 1, dtype=torch.float64), n=64)
    assert slope > 3.7, slope


def test_ddim_eta0_equals_dpm_solver_1():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64) * 5
    sig = torch.cat([karras_sigmas(10, 0.05, 5.0), torch.zeros(1, dtype=torch.float64)])
    a = SAMPLERS["ddim"](gauss_denoiser, x.clone(), sig, disable=True)
    b = SAMPLERS["dpm_solver_1"](gauss_denoiser, x.clone(), sig, disable=True)
    assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("name,kw", [("ddpm", {}), ("euler_ancestral", {}), ("dpmpp_2m_sde", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_samplers_reproduce_data_moments(name, kw):
    # ancestral steps ignore the posterior variance of x0, a variance deficit that vanishes as steps grow
    g = torch.Generator().manual_seed(2)
    sig = torch.cat([karras_sigmas(400, 0.01, 20.0), torch.zeros(1, dtype=torch.float64)])
    n = 20000
    x = M + torch.sqrt(S ** 2 + sig[0] ** 2) * torch.randn(n, 8, generator=g, dtype=torch.float64)
    out = SAMPLERS[name](gauss_denoiser, x, sig, disable=True, generator=g, **kw)
    assert torch.allclose(out.mean(0), M, atol=0.04), out.mean(0) - M
    assert torch.allclose(out.std(0), S, rtol=0.03), out.std(0) / S


def _vp_nets(ac: torch.Tensor):
    """eps / x0 / v networks of discrete VP form, built from the exact Gaussian denoiser."""
    sched = DiscreteSchedule(ac)

    def parts(x_vp, t):
        sigma = sched.t_to_sigma(t).to(x_vp.dtype)
        s = sigma.view(-1, 1)
        x = x_vp * torch.sqrt(1 + s ** 2)
        x0 = gauss_denoiser(x, sigma)
        eps = (x - x0) / s
        return x0, eps, s

    def net_eps(x_vp, t):
        return parts(x_vp, t)[1]

    def net_x0(x_vp, t):
        return parts(x_vp, t)[0]

    def net_v(x_vp, t):
        x0, eps, s = parts(x_vp, t)
        return eps / torch.sqrt(1 + s ** 2) - s / torch.sqrt(1 + s ** 2) * x0

    return {"eps": net_eps, "x0": net_x0, "v": net_v}


def sd_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_same_answer_for_eps_x0_v(name):
    ac = sd_alphas_cumprod()
    nets = _vp_nets(ac)
    outs = []
    for p, net in nets.items():
        den = vp_denoiser(net, ac, p)
        sig = get_sigmas(den.schedule, 10, "karras").double()
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, 8, generator=g, dtype=torch.float64) * sig[0]
        outs.append(get_sampler(name)(den, x, sig, disable=True, **({"generator": g} if name in STOCHASTIC else {})))
    assert torch.allclose(outs[0], outs[1], atol=1e-4) and torch.allclose(outs[0], outs[2], atol=1e-4)


def test_denoiser_recovers_exact_x0_for_each_parameterization():
    ac = sd_alphas_cumprod()
    for p, net in _vp_nets(ac).items():
        den = vp_denoiser(net, ac, p)
        sigma = den.sigmas[[10, 500, 990]].double()
        x = torch.randn(3, 8, dtype=torch.float64) * 3
        assert torch.allclose(den(x, sigma), gauss_denoiser(x, sigma), atol=1e-4), p


def test_sigma_timestep_maps_roundtrip():
    sched = DiscreteSchedule(sd_alphas_cumprod())
    t = torch.tensor([0.0, 1.0, 10.5, 998.25, 999.0])
    assert torch.allclose(sched.sigma_to_t(sched.t_to_sigma(t)), t, atol=1e-3)
    q = DiscreteSchedule(sd_alphas_cumprod(), quantize=True)
    assert q.sigma_to_t(q.sigmas[[3, 700]]).tolist() == [3, 700]


def test_spacings():
    assert list(compvis_ddim_timesteps(1000, 50))[:3] == [1, 21, 41] and compvis_ddim_timesteps(1000, 50)[-1] == 981
    sched = DiscreteSchedule(sd_alphas_cumprod())
    s = get_sigmas(sched, 50, "uniform")
    assert len(s) == 51 and torch.allclose(s[0], sched.sigmas[981]) and torch.allclose(s[-1], sched.sigmas[0])
    t = get_sigmas(sched, 10, "trailing")
    assert torch.allclose(t[0], sched.sigmas[999]) and float(t[-1]) == 0.0
    k = get_sigmas(sched, 10, "karras")
    assert torch.all(k[:-1][1:] < k[:-1][:-1]) and float(k[-1]) == 0.0
    with pytest.raises(KeyError, match="known"):
        get_sampler("nope")


def test_cfg_is_one_batched_forward_and_right_formula():
    calls = []

    def den(x, sigma, y=None):
        calls.append(x.shape[0])
        return x * 0 + y.view(-1, 1).double()

    cfg = CFGDenoiser(den, scale=3.0)
    x, sig = torch.zeros(2, 4, dtype=torch.float64), torch.ones(2)
    out = cfg(x, sig, cond={"y": torch.tensor([2.0, 2.0])}, uncond={"y": torch.tensor([1.0, 1.0])})
    assert calls == [4] and torch.allclose(out, torch.full_like(out, 1 + 3 * (2 - 1)))


@pytest.mark.parametrize("p", ["eps", "v"])
def test_guidance_rescale_equals_diffusers_on_the_model_output(p):
    """Guidance rescale acts on eps / v (diffusers `rescale_noise_cfg`), not on the x0 estimate."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    ac = sd_alphas_cumprod()
    g = torch.Generator().manual_seed(11)
    w_u, w_c = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)

    def net(x_vp, t, y=None):  # a network whose output depends on the condition and the input
        w = torch.where(y.view(-1, 1, 1) > 0, w_c, w_u)
        return torch.einsum("bi,bij->bj", x_vp, w) * (1 + t.view(-1, 1) / 1000)

    den = vp_denoiser(net, ac, p)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64) * 4
    sigma = den.sigmas[[100, 400, 800]].double()
    phi, scale = 0.7, 6.0
    ours = CFGDenoiser(den, scale=scale, rescale=phi)(x, sigma, cond={"y": torch.ones(3)}, uncond={"y": torch.zeros(3)})
    t = den.schedule.sigma_to_t(sigma)
    x_vp = x / torch.sqrt(1 + sigma.view(-1, 1) ** 2)
    f_u, f_c = net(x_vp, t, torch.zeros(3)), net(x_vp, t, torch.ones(3))
    f = rescale_noise_cfg(f_u + scale * (f_c - f_u), f_c, guidance_rescale=phi)
    assert torch.allclose(ours, den.from_model_output(x, sigma, f), atol=1e-10)
    # on the x0 estimate (the old behaviour) the answer differs
    d_u, d_c = den.from_model_output(x, sigma, f_u), den.from_model_output(x, sigma, f_c)
    assert not torch.allclose(ours, rescale_noise_cfg(d_u + scale * (d_c - d_u), d_c, guidance_rescale=phi), atol=1e-3)
    with pytest.raises(TypeError, match="Denoiser"):
        CFGDenoiser(lambda x, s: x, scale=2.0, rescale=0.5)


def test_thresholding_modes_exact_values():
    x = torch.tensor([[0.5, 3.0, -4.0, 2.0]])
    dyn = ThresholdedDenoiser(lambda x, s: x, mode="dynamic", percentile=0.5)(x, torch.ones(1))
    # the 0.5-quantile of |x| = (0.5, 2, 3, 4) is 2.5: clamp to +-2.5, divide by 2.5
    assert torch.allclose(dyn, torch.tensor([[0.2, 1.0, -1.0, 0.8]]))
    static = ThresholdedDenoiser(lambda x, s: x, mode="static")(x, torch.ones(1))
    assert torch.equal(static, torch.tensor([[0.5, 1.0, -1.0, 1.0]]))
    norm = ThresholdedDenoiser(lambda x, s: x, mode="norm", max_value=1.5)(x, torch.ones(1))
    rms = float(x.pow(2).mean().sqrt())  # 2.7157: scaled down to RMS 1.5
    assert torch.allclose(norm, x * 1.5 / rms) and abs(float(norm.pow(2).mean().sqrt()) - 1.5) < 1e-6
    small = torch.full((1, 4), 0.1)  # RMS below the threshold: unchanged
    assert torch.equal(ThresholdedDenoiser(lambda x, s: x, mode="norm", max_value=1.5)(small, torch.ones(1)), small)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_inpainting_mask_keeps_known_region_with_every_sampler(name):
    known = torch.full((2, 8), 0.7, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.float64)
    mask[:, :3] = 1
    den = MaskedDenoiser(gauss_denoiser, mask, known)
    sig = torch.cat([karras_sigmas(12, 0.02, 10.0), torch.zeros(1, dtype=torch.float64)])
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, generator=g, dtype=torch.float64) * 10
    out = get_sampler(name)(den, x, sig, disable=True, **({"generator": g} if name in STOCHASTIC else {}))
    assert torch.allclose(out[:, :3], known[:, :3], atol=1e-6)


def test_img2img_strength():
    sig = torch.cat([karras_sigmas(20, 0.02, 10.0), torch.zeros(1)])
    x0, noise = torch.zeros(1, 4), torch.ones(1, 4)
    x, rest = img2img_start(x0, sig, 0.5, noise)
    assert len(rest) == 11 and torch.allclose(x, noise * rest[0] / torch.sqrt(1 + rest[0] ** 2))  # VP sample
    x, rest = img2img_start(x0, sig, 1.0, noise)
    assert len(rest) == 21
    # int(strength * steps) steps, as CompVis and diffusers: 0.59 of 10 runs 5 (rounding would run 6)
    _, rest = img2img_start(x0, sig[10:], 0.59, noise)
    assert len(rest) == 6
    with pytest.raises(ValueError):
        img2img_start(x0, sig, 0.0, noise)
    with pytest.raises(ValueError, match="0 denoising steps"):
        img2img_start(x0, sig, 0.04, noise)


class _CompVisLike(torch.nn.Module):
    """What a CompVis LatentDiffusion exposes to its samplers, around an eps network."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod().float())
        self.num_timesteps = 1000
        self.parameterization = "eps"
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def apply_model(self, x, t, c):
        self.calls.append(t.clone())
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return 0.3 * x * (1 - a).sqrt() + 0.1 * c  # some smooth eps model


def _compvis_ddim_reference(model, S, x, c, eta=0.0):
    """The CompVis DDIM loop (p_sample_ddim) written out for comparison."""
    ac = model.alphas_cumprod.double()
    ts = compvis_ddim_timesteps(1000, S)
    alphas, alphas_prev = ac[ts], torch.cat([ac[:1], ac[ts[:-1]]])
    x = x.double()
    for index in reversed(range(S)):
        t = torch.full((x.shape[0],), int(ts[index]), dtype=torch.long)
        e = model.apply_model(x.float(), t, c).double()
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e
    return x


def _compvis_plms_reference(model, S, x, c, mask=None, x0=None, generator=None):
    """The CompVis PLMS loop (p_sample_plms) written out for comparison; with `mask`, CompVis' inpainting blend."""
    ac = model.alphas_cumprod.double()
    ts = compvis_ddim_timesteps(1000, S)
    alphas, alphas_prev = ac[ts], torch.cat([ac[:1], ac[ts[:-1]]])
    time_range = np.flip(ts)
    x = x.double()
    old_eps = []

    def step(x, e, index):
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e

    def eps(x, t):
        return model.apply_model(x.float(), torch.full((x.shape[0],), int(t), dtype=torch.long), c).double()

    for i, t in enumerate(time_range):
        index = S - i - 1
        t_next = time_range[min(i + 1, len(time_range) - 1)]
        if mask is not None:  # img_orig = q_sample(x0, ts), blended into x before the step (not into x_prev)
            a_t = alphas[index]
            noise = torch.randn(x0.shape, generator=generator).double()
            x = (a_t.sqrt() * x0.double() + (1 - a_t).sqrt() * noise) * mask + (1 - mask) * x
        e_t = eps(x, t)
        if len(old_eps) == 0:
            x_prev = step(x, e_t, index)
            e_prime = (e_t + eps(x_prev, t_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = step(x, e_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


@pytest.mark.parametrize("S", [10, 50])
def test_compvis_ddim_shell_reproduces_compvis(S):
    model = _CompVisLike()
    g = torch.Generator().manual_seed(5)
    x_T, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = _compvis_ddim_reference(model, S, x_T, c)
    model.calls.clear()
    sampler = DDIMSampler(model)
    out, inter = sampler.sample(S, 2, (4, 8, 8), conditioning=c, x_T=x_T, eta=0.0, verbose=False, log_every_t=5)
    called = [int(t[0]) for t in model.calls]
    assert called == list(range(1, 1000, 1000 // S))[::-1]
    assert torch.allclose(out.double(), ref, atol=1e-4), (out.double() - ref).abs().max()
    assert list(sampler.ddim_timesteps) == list(range(1, 1000, 1000 // S))
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) >= 2


def test_compvis_plms_shell_reproduces_compvis():
    S = 20
    model = _CompVisLike()
    g = torch.Generator().manual_seed(6)
    x_T, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = _compvis_plms_reference(model, S, x_T, c)
    model.calls.clear()
    out, _ = PLMSSampler(model).sample(S, 2, (4, 8, 8), conditioning=c, x_T=x_T, verbose=False)
    called = [int(t[0]) for t in model.calls]
    ts = list(range(1, 1000, 1000 // S))[::-1]
    assert called == [ts[0], ts[1]] + ts[1:]  # the pseudo improved-Euler first step evaluates t_next too
    assert torch.allclose(out.double(), ref, atol=1e-4), (out.double() - ref).abs().max()
    with pytest.raises(ValueError, match="eta"):
        PLMSSampler(model).sample(S, 2, (4, 8, 8), conditioning=c, eta=0.5, verbose=False)


def test_compvis_plms_shell_inpaints_as_compvis():
    model = _CompVisLike()
    g = torch.Generator().manual_seed(7)
    x_T, c, x0 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 5:] = 1
    ref = _compvis_plms_reference(model, 10, x_T, c, mask=mask, x0=x0, generator=torch.Generator().manual_seed(3))
    out, _ = PLMSSampler(model).sample(10, 2, (4, 8, 8), conditioning=c, x_T=x_T, mask=mask, x0=x0, verbose=False,
                                       generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.double(), ref, atol=1e-4), (out.double() - ref).abs().max()


def test_compvis_shell_guidance_batches_uncond_first():
    model = _CompVisLike()
    seen = []
    orig = model.apply_model

    def spy(x, t, c):
        seen.append(c.clone())
        return orig(x, t, c)

    model.apply_model = spy
    c, u = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    DDIMSampler(model).sample(2, 1, (4, 8, 8), conditioning=c, unconditional_conditioning=u,
                              unconditional_guidance_scale=5.0, verbose=False)
    assert seen[0].shape[0] == 2 and float(seen[0][0].abs().sum()) == 0 and float(seen[0][1].min()) == 1


def test_the_registry_describes_each_sampler_as_its_signature_is():
    """Callers read a sampler's options from the registry, never from its signature; the description must be true."""
    import inspect

    from ldm.sampling.registry import SAMPLER_INFO, eta_option
    shared = {"model", "x", "sigmas", "extra_args", "callback", "disable", "generator"}
    for name, info in SAMPLER_INFO.items():
        own = tuple(p for p in inspect.signature(info.fn).parameters if p not in shared)
        assert own == info.options, name
    assert eta_option("ddim", 0.5) == {"eta": 0.5} and eta_option("euler", 0.0) == {}
    with pytest.raises(ValueError, match="sampler 'heun' has no eta"):
        eta_option("heun", 0.3)


def test_compvis_ddim_shell_decode_runs_any_compvis_like_model_as_its_sample_does():
    """decode (img2img's second half) goes through ldm.generation.generate, which must not ask a CompVis-like model
    for more than the shells read (no .device, no sampling defaults)."""
    model = _CompVisLike()
    g = torch.Generator().manual_seed(7)
    x_T, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sampler = DDIMSampler(model)
    sampled, _ = sampler.sample(10, 2, (4, 8, 8), conditioning=c, x_T=x_T, verbose=False)
    decoded = sampler.decode(x_T, c, t_start=len(sampler.ddim_timesteps))
    assert decoded.shape == sampled.shape and torch.allclose(decoded, sampled, atol=1e-4), \
        (decoded - sampled).abs().max()
