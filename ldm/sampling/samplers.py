"""Samplers with one contract: `sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None)`.

`model(x, sigma, **extra_args)` is a denoiser returning the x0 estimate D(x, sigma); `x` starts at
`sigmas[0]` noise level (x = x0 + sigmas[0] * noise) and the sampler returns x at `sigmas[-1]`
(a trailing 0 gives clean samples). Samplers call nothing but the model. `generator` is a
torch.Generator or one per image of the batch (each image then reproduces from its own seed
whatever the batch); deterministic samplers accept and ignore it. Use `ldm.sampling.sample` to run
one from VP latents.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import trange

from ldm.core.algebra import ddim_move, to_d
from ldm.core.denoiser import append_dims

Denoiser = Callable[..., torch.Tensor]
Callback = Optional[Callable[[dict], None]]
Generator = Union[torch.Generator, Sequence[torch.Generator], None]


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like `x`; with a list of generators, image i draws from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"{len(gens)} generators given for a batch of {x.shape[0]}: pass one per image, or one")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in gens])


def _report(callback: Callback, x, i, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _sig(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma * x.new_ones([x.shape[0]])


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) splitting a step into a deterministic part and fresh noise.

    sigma_up^2 = eta^2 sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2: with eta = 1 this is the
    DDPM posterior variance (Ho et al. 2020), and for any eta the DDIM sigma_t(eta) of Song et al.
    2021 (eq. 16) written in the variance-exploding form.
    """
    if not eta or float(sigma_to) == 0.0:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                 callback: Callback = None, disable: Optional[bool] = None,
                 generator: Generator = None) -> torch.Tensor:
    """Euler method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="euler"):
        denoised = model(x, _sig(sigmas[i], x), **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                callback: Callback = None, disable: Optional[bool] = None, eta: float = 0.0,
                generator: Generator = None) -> torch.Tensor:
    """DDIM (Song et al. 2021): x_next = x0 + sigma_down * eps + sigma_up * z, eq. 12 in VE form."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="ddim"):
        denoised = model(x, _sig(sigmas[i], x), **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = ddim_step(x, sigmas[i], sigmas[i + 1], denoised, eta=eta, generator=generator)
    return x


@torch.no_grad()
def sample_consistency(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                       callback: Callback = None, disable: Optional[bool] = None,
                       generator: Generator = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): the model's output is the clean estimate; each
    later step noises it afresh to the next level and maps it back. One step is one evaluation."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="consistency"):
        denoised = model(x, _sig(sigmas[i], x), **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if float(sigmas[i + 1]) > 0:
            x = denoised + randn_like(x, generator) * sigmas[i + 1]  # x = x0 + sigma z at the next level
    return x


def ddim_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, denoised: torch.Tensor,
              eps: Optional[torch.Tensor] = None, eta: float = 0.0, generator: Generator = None) -> torch.Tensor:
    """One DDIM step from the x0 estimate `denoised`; `eps` defaults to the one implied by x (CompVis passes the
    model's own eps when x0 was thresholded)."""
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
    x = ddim_move(x, sigma, sigma_down, denoised, eps)  # DDIM update, Song et al. 2021, eq. 12
    if float(sigma_up) > 0:
        x = x + randn_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                           callback: Callback = None, disable: Optional[bool] = None, eta: float = 1.0,
                           s_noise: float = 1.0, generator: Generator = None) -> torch.Tensor:
    """Ancestral Euler (Karras et al. 2022 notation): Euler to sigma_down, then add sigma_up noise."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="euler_ancestral"):
        denoised = model(x, _sig(sigmas[i], x), **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if float(sigma_up) > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_ddpm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                callback: Callback = None, disable: Optional[bool] = None,
                generator: Generator = None) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020): draw from the posterior q(x_next | x, x0 = D(x))."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="ddpm"):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _sig(s, x), **extra_args)
        _report(callback, x, i, s, s, denoised)
        # Gaussian posterior between noise levels s > s_next in VE form: mean interpolates x and x0.
        ratio = (s_next / s) ** 2
        mean = ratio * x + (1 - ratio) * denoised
        var = s_next ** 2 * (1 - ratio)
        x = mean + (randn_like(x, generator) * var.sqrt() if float(s_next) > 0 else 0.0)
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                callback: Callback = None, disable: Optional[bool] = None,
                generator: Generator = None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1 without churn); Euler for a step to sigma 0."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="heun"):
        denoised = model(x, _sig(sigmas[i], x), **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if float(sigmas[i + 1]) == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, _sig(sigmas[i + 1], x), **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_plms(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                callback: Callback = None, disable: Optional[bool] = None,
                generator: Generator = None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, PNDM): pseudo linear multistep on eps; a pseudo improved-Euler first step."""
    extra_args = extra_args or {}
    old_eps: list[torch.Tensor] = []
    for i in trange(len(sigmas) - 1, disable=disable, desc="plms"):
        denoised = model(x, _sig(sigmas[i], x), **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = plms_step(model, x, sigmas[i], sigmas[i + 1], to_d(x, sigmas[i], denoised), old_eps, extra_args)
    return x


def plms_step(model: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, eps: torch.Tensor,
              old_eps: list[torch.Tensor], extra_args: dict,
              x0_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """One PLMS step given this step's eps; `old_eps` (the last three) is updated in place. `x0_fn` transforms the
    x0 of each DDIM-form update (CompVis/SD2 thresholding)."""

    def update(e: torch.Tensor, s_to: torch.Tensor) -> torch.Tensor:
        x0 = x - e * sigma
        return (x0 if x0_fn is None else x0_fn(x0)) + e * s_to  # DDIM (eta 0) step with the combined eps

    if not old_eps:
        if float(sigma_next) > 0:  # evaluate at the DDIM-predicted next point, average the two eps
            x_pred = update(eps, sigma_next)
            eps_next = to_d(x_pred, sigma_next, model(x_pred, _sig(sigma_next, x), **extra_args))
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = eps
    elif len(old_eps) == 1:
        eps_prime = (3 * eps - old_eps[-1]) / 2  # Adams-Bashforth 2
    elif len(old_eps) == 2:
        eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12  # Adams-Bashforth 3
    else:
        eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24  # Adams-Bashforth 4
    old_eps.append(eps)
    if len(old_eps) > 3:
        old_eps.pop(0)
    return update(eps_prime, sigma_next)


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR lambda = -log(sigma) in the VE form (alpha = 1)."""
    return -sigma.log()


@torch.no_grad()
def sample_dpm_solver_1(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                        callback: Callback = None, disable: Optional[bool] = None,
                        generator: Generator = None) -> torch.Tensor:
    """DPM-Solver-1 in data prediction (Lu et al. 2022, DPM-Solver++ eq. 8 with k = 1)."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="dpm_solver_1"):
        denoised = model(x, _sig(sigmas[i], x), **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if float(sigmas[i + 1]) == 0:
            x = denoised
        else:
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                    callback: Callback = None, disable: Optional[bool] = None,
                    generator: Generator = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in data prediction."""
    extra_args = extra_args or {}
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable, desc="dpmpp_2m"):
        denoised = model(x, _sig(sigmas[i], x), **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if float(sigmas[i + 1]) == 0:
            x = denoised
            continue
        h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
        if old_denoised is None:
            d = denoised
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                        callback: Callback = None, disable: Optional[bool] = None, eta: float = 1.0,
                        s_noise: float = 1.0, generator: Generator = None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5 / appendix): stochastic second-order multistep."""
    extra_args = extra_args or {}
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable, desc="dpmpp_2m_sde"):
        denoised = model(x, _sig(sigmas[i], x), **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if float(sigmas[i + 1]) == 0:
            x = denoised
            continue
        h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
        eta_h = eta * h
        # x_t = (s_t / s_s) e^{-eta h} x_s + (1 - e^{-(1 + eta) h}) x0 + s_t sqrt(1 - e^{-2 eta h}) z
        x = (sigmas[i + 1] / sigmas[i]) * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * denoised
        if old_denoised is not None:
            r = h_last / h
            x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
        if eta:
            x = x + randn_like(x, generator) * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def _unipc_coeffs(h: torch.Tensor, rks: list[torch.Tensor], order: int, corrector: bool) -> torch.Tensor:
    """rho coefficients of UniPC with B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, Alg. 2-3)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh)
    r_rows, b = [], []
    factorial = 1
    rk_all = torch.stack(rks)
    for k in range(1, order + 1):
        r_rows.append(rk_all ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, bv = torch.stack(r_rows), torch.stack(b)
    if corrector:
        return torch.tensor([0.5], dtype=h.dtype) if order == 1 else torch.linalg.solve(R, bv)
    if order == 2:
        return torch.tensor([0.5], dtype=h.dtype)
    return torch.linalg.solve(R[:-1, :-1], bv[:-1])


@torch.no_grad()
def sample_unipc(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                 callback: Callback = None, disable: Optional[bool] = None, order: int = 2,
                 use_corrector: bool = True, lower_order_final: bool = True, generator: Generator = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): UniP-`order` predictor with the UniC corrector, B(h) = e^h - 1."""
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    hist_x0: list[torch.Tensor] = []
    hist_lam: list[torch.Tensor] = []
    x_prev, sigma_prev, used_order = None, None, 1
    for i in trange(n, disable=disable, desc="unipc"):
        s = sigmas[i]
        denoised = model(x, _sig(s, x), **extra_args)
        _report(callback, x, i, s, s, denoised)
        if use_corrector and x_prev is not None and float(s) > 0:
            x = _unipc_update(x_prev, sigma_prev, s, hist_x0, hist_lam, used_order, denoised)
        hist_x0.append(denoised)
        hist_lam.append(_lam(s))
        hist_x0, hist_lam = hist_x0[-order:], hist_lam[-order:]
        s_next = sigmas[i + 1]
        if float(s_next) == 0:
            x = denoised
            break
        this_order = min(order, len(hist_x0))
        if lower_order_final:  # order at most the steps left (UniPC reference, diffusers)
            this_order = min(this_order, n - i)
        x_prev, sigma_prev, used_order = x, s, this_order
        x = _unipc_update(x, s, s_next, hist_x0, hist_lam, this_order, None)
    return x


def _unipc_update(x: torch.Tensor, s0: torch.Tensor, s_t: torch.Tensor, hist_x0: list, hist_lam: list, order: int,
                  model_t: Optional[torch.Tensor]) -> torch.Tensor:
    """One UniP (model_t None) or UniC (model_t given) step from noise level s0 to s_t."""
    corrector = model_t is not None
    m0, lam0 = hist_x0[-1], hist_lam[-1]
    h = _lam(s_t) - lam0
    rks, d1s = [], []
    for k in range(1, order):
        mk, lamk = hist_x0[-(k + 1)], hist_lam[-(k + 1)]
        rk = (lamk - lam0) / h
        rks.append(rk)
        d1s.append((mk - m0) / rk)
    rks.append(torch.ones_like(h))
    rhos = _unipc_coeffs(h, rks, order, corrector).to(x.dtype)
    h_phi_1 = torch.expm1(-h)
    b_h = torch.expm1(-h)
    x_t = (s_t / s0) * x - h_phi_1 * m0
    res = torch.zeros_like(x)
    for k, d in enumerate(d1s):
        res = res + rhos[k] * d
    if corrector:
        res = res + rhos[-1] * (model_t - m0)
    return x_t - b_h * res
