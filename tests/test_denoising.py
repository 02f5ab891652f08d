"""The denoising core: scaling objects, sigma <-> timestep maps, zero terminal SNR, the sampling entry point,
per-image generators, spacing checks, UniPC's final order, and the CompVis shells' inpainting and thresholding."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.diffusionmodules.schedule import make_beta_schedule, rescale_zero_terminal_snr
from ldm.sampling import (SAMPLERS, Denoiser, DiscreteSchedule, get_sigmas, karras_sigmas, randn_like,
                          sample, scaling_for, vp_scale)
from ldm.core.scaling import vp_coefficients
from ldm.core.spacing import compvis_ddim_timesteps


def sd_ac(zero_terminal_snr: bool = False) -> torch.Tensor:
    b = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    if zero_terminal_snr:
        b = rescale_zero_terminal_snr(b)
    return torch.cumprod(torch.tensor(1 - b, dtype=torch.float64), 0)


# -- scaling objects ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", ["eps", "x0", "v"])
def test_scaling_target_gives_back_x0_in_vp_and_ve_form(p):
    """The training target of a scaling makes the same scaling's denoiser exact (training and sampling agree)."""
    sc = scaling_for(p)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.03, 0.5, 3.0, 80.0], dtype=torch.float64)
    alpha, s = vp_coefficients(sigma)
    alpha, s = alpha[:, None], s[:, None]
    target = sc.target(x0, noise, alpha, s)
    assert torch.allclose(target, {"eps": noise, "x0": x0, "v": alpha * noise - s * x0}[p], atol=1e-12)
    skip, out = sc.vp(alpha, s)
    assert torch.allclose(skip * (alpha * x0 + s * noise) + out * target, x0, atol=1e-9)
    c_skip, c_out, c_in, c_noise = sc(sigma)
    x_ve = x0 + sigma[:, None] * noise
    assert torch.allclose(c_in[:, None] * x_ve, alpha * x0 + s * noise, atol=1e-9)
    assert torch.allclose(c_skip[:, None] * x_ve + c_out[:, None] * target, x0, atol=1e-9)
    assert torch.equal(c_noise, sigma)


def test_v_and_x0_scalings_are_finite_at_zero_terminal_snr():
    """At alpha = 0 (sigma = inf) the v estimate is -v and the x0 estimate is F; the eps target is the noise."""
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    c_skip, c_out, c_in, _ = scaling_for("v")(inf)
    assert float(c_skip) == 0 and float(c_out) == -1 and float(c_in) == 0
    alpha, s = vp_coefficients(inf)
    x0, noise = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    assert torch.allclose(scaling_for("v").target(x0, noise, alpha, s), -x0)
    assert torch.equal(scaling_for("eps").target(x0, noise, alpha, s), noise)


def test_unknown_parameterization_is_named():
    with pytest.raises(ValueError, match="'eps2'"):
        scaling_for("eps2")


# -- sigma <-> timestep ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing,steps", [("uniform", 50), ("uniform", 20), ("trailing", 50), ("leading", 50),
                                           ("linspace", 30), ("uniform", 500)])
def test_grid_sigmas_map_to_exactly_their_integer_timestep(spacing, steps):
    """Old code: DDIM 50 sent t - 1 on 8 of 50 steps (float32 log-sigma round-off, then floor)."""
    sched = DiscreteSchedule(sd_ac())
    sig = get_sigmas(sched, steps, spacing)
    t = sched.sigma_to_t(sig[:-1] if float(sig[-1]) == 0 else sig)
    assert torch.equal(t, t.round()), t[t != t.round()]
    expected = sched.sigmas.double()
    assert torch.equal(sched.sigmas[t.long()], sig[:len(t)])
    assert torch.allclose(expected[t.long()].float(), sig[:len(t)])
    if spacing == "uniform":
        assert t.long().tolist()[:-1][::-1] == compvis_ddim_timesteps(1000, steps).tolist()


def test_off_grid_sigmas_get_fractional_timesteps():
    sched = DiscreteSchedule(sd_ac())
    t = torch.tensor([0.5, 10.25, 500.75, 998.5])
    assert torch.allclose(sched.sigma_to_t(sched.t_to_sigma(t)), t, atol=2e-3)
    k = get_sigmas(sched, 20, "karras")[:-1]
    tk = sched.sigma_to_t(k)
    assert (tk != tk.round()).sum() >= 15  # Karras levels sit between the grid points
    q = DiscreteSchedule(sd_ac(), quantize=True)
    assert q.sigma_to_t(q.t_to_sigma(torch.tensor([10.4, 10.6]))).tolist() == [10, 11]


# -- zero terminal SNR ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["uniform", "leading", "trailing", "linspace", "karras"])
def test_zero_terminal_snr_schedules_sample_with_finite_values(spacing):
    """Old code: every spacing reaching the last timestep gave sigma = inf and NaN samples."""
    ac = sd_ac(zero_terminal_snr=True)
    assert float(ac[-1]) == 0.0
    sched = DiscreteSchedule(ac)
    assert float(sched.sigma_max) == pytest.approx(((1 - 2.0 ** -24) / 2.0 ** -24) ** 0.5)
    sig = get_sigmas(sched, 25, spacing)
    assert torch.isfinite(sig).all()
    w = torch.randn(6, 6, dtype=torch.float64) * 0.1

    def v_net(x_vp, t):
        return x_vp @ w  # any v-network: the estimate must stay finite at the terminal step

    den = Denoiser(v_net, scaling_for("v"), sched)
    out = sample(den, torch.randn(3, 6, dtype=torch.float64), sig.double(), "dpmpp_2m")
    assert torch.isfinite(out).all()


# -- entry point, generators, spacing checks --------------------------------------------------------------------------
def _linear_denoiser():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.1
    return Denoiser(lambda x_vp, t: x_vp @ w * (1 + t.view(-1, 1).double() / 1000), scaling_for("eps"),
                    DiscreteSchedule(sd_ac()))


def test_entry_point_converts_vp_to_ve_once():
    den = _linear_denoiser()
    sig = get_sigmas(den.schedule, 10, "uniform").double()
    x_vp = torch.randn(2, 8, dtype=torch.float64)
    by_hand = SAMPLERS["ddim"](den, x_vp / vp_scale(sig[0]), sig, disable=True) * vp_scale(sig[-1])
    assert torch.allclose(sample(den, x_vp, sig, "ddim"), by_hand, atol=1e-12)
    with pytest.raises(TypeError, match="takes no option 'eta'"):
        sample(den, x_vp, sig, "euler", eta=0.5)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_per_image_generators_make_each_image_independent_of_the_batch(name):
    den = _linear_denoiser()
    sig = get_sigmas(den.schedule, 8, "karras").double()
    seeds = [11, 12, 13]

    def run(seed_list):
        gens = [torch.Generator().manual_seed(s) for s in seed_list]
        x = randn_like(torch.empty(len(seed_list), 8, dtype=torch.float64), gens)
        return sample(den, x, sig, name, generator=gens, **({"eta": 1.0} if name == "ddim" else {}))

    batch = run(seeds)
    alone = torch.cat([run([s]) for s in seeds])
    assert torch.allclose(batch, alone, atol=1e-10)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="one per image"):
        randn_like(torch.empty(2, 3), [torch.Generator()])


def test_spacings_refuse_repeated_or_rising_levels():
    sched = DiscreteSchedule(sd_ac())
    with pytest.raises(ValueError, match="at most 500"):
        get_sigmas(sched, 600, "uniform")  # old code: the last timestep repeated (clipped 1000 -> 999)
    with pytest.raises(ValueError, match="strictly decrease"):
        get_sigmas(sched, 1200, "leading")
    with pytest.raises(ValueError, match="strictly decrease"):
        sample(_linear_denoiser(), torch.zeros(1, 8), torch.tensor([5.0, 2.0, 2.0, 0.0]), "dpmpp_2m")
    assert len(get_sigmas(sched, 1000, "trailing")) == 1001


def test_unipc_lowers_its_order_on_the_last_steps_whatever_the_step_count():
    """Old code lowered the final order only below 15 steps; the reference and diffusers always do."""
    den = _linear_denoiser()
    sig = karras_sigmas(21, 0.05, 10.0)  # 20 steps ending above 0, so the final steps are real UniPC steps
    x = torch.randn(2, 8, dtype=torch.float64) * 10
    low = SAMPLERS["unipc"](den, x.clone(), sig, disable=True, order=3, lower_order_final=True)
    full = SAMPLERS["unipc"](den, x.clone(), sig, disable=True, order=3, lower_order_final=False)
    assert not torch.allclose(low, full, atol=1e-8)


# -- CompVis shells: inpainting and thresholding ----------------------------------------------------------------------
class _CompVisEps(torch.nn.Module):
    """What a CompVis LatentDiffusion exposes to its samplers, around a smooth eps network of (x, t, c)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", sd_ac().float())
        self.num_timesteps, self.parameterization = 1000, "eps"
        self.w = torch.nn.Parameter(torch.zeros(()))

    def apply_model(self, x, t, c):
        a = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return 0.6 * x * (1 - a).sqrt() + 0.3 * c + 0.1 * x.flip(-1)


def _compvis_ddim_loop(model, S, x, c, mask=None, x0=None, dynamic_threshold=None, generator=None):
    """CompVis `ddim_sampling` / `p_sample_ddim` (SD2 version) written out, eta 0, in VP form."""
    ac = model.alphas_cumprod.double()
    ts = compvis_ddim_timesteps(1000, S)
    alphas, alphas_prev = ac[ts], torch.cat([ac[:1], ac[ts[:-1]]])
    x = x.double()
    for index in reversed(range(len(ts))):
        t = torch.full((x.shape[0],), int(ts[index]), dtype=torch.long)
        a_t, a_prev = alphas[index], alphas_prev[index]
        if mask is not None:  # img_orig = q_sample(x0, ts); img = img_orig * mask + (1 - mask) * img
            noise = torch.randn(x0.shape, generator=generator).double()
            x = (a_t.sqrt() * x0.double() + (1 - a_t).sqrt() * noise) * mask + (1 - mask) * x
        e = model.apply_model(x.float(), t, c).double()
        pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        if dynamic_threshold is not None:  # SD2 norm_thresholding
            s = pred_x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=dynamic_threshold).view(-1, 1, 1, 1)
            pred_x0 = pred_x0 * (dynamic_threshold / s)
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e
    return x


def test_ddim_shell_inpaints_as_compvis():
    """Old code replaced the x0 estimate instead of blending re-noised known latents into x_t."""
    model = _CompVisEps()
    g = torch.Generator().manual_seed(5)
    x_T, c, x0 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    ref = _compvis_ddim_loop(model, 20, x_T, c, mask=mask, x0=x0, generator=torch.Generator().manual_seed(9))
    out, _ = DDIMSampler(model).sample(20, 2, (4, 8, 8), conditioning=c, x_T=x_T, mask=mask, x0=x0, verbose=False,
                                       generator=torch.Generator().manual_seed(9))
    assert torch.allclose(out.double(), ref, atol=1e-4), (out.double() - ref).abs().max()


def test_ddim_shell_thresholds_as_stable_diffusion_2():
    """Old code clamped latents to +-1 (Imagen thresholding); SD2 caps the RMS of x0 and keeps the model's eps."""
    model = _CompVisEps()
    g = torch.Generator().manual_seed(6)
    x_T, c = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g) * 3
    ref = _compvis_ddim_loop(model, 10, x_T, c, dynamic_threshold=1.2)
    out, _ = DDIMSampler(model).sample(10, 2, (4, 8, 8), conditioning=c, x_T=x_T, dynamic_threshold=1.2, verbose=False)
    assert torch.allclose(out.double(), ref, atol=1e-4), (out.double() - ref).abs().max()
    plain = _compvis_ddim_loop(model, 10, x_T, c)
    assert not torch.allclose(plain, ref, atol=1e-2)  # the threshold is active in this setting
