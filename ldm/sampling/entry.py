"""One sampling entry point: VP latents in, VP latents out; the VP <-> VE conversion is done here only."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ldm.sampling.registry import get_sampler, sampler_info
from ldm.sampling.samplers import Callback, Generator
from ldm.core.spacing import check_sigmas


def vp_scale(sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(alpha_cumprod) = 1 / sqrt(1 + sigma^2): a VE sample times this is the VP sample."""
    return torch.rsqrt(1.0 + sigma ** 2)


def sample(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
           sampler: Union[str, Callable] = "ddim", generator: Generator = None, extra_args: Optional[dict] = None,
           callback: Callback = None, disable: bool = True, **options) -> torch.Tensor:
    """Run `sampler` (a registry name or a sampler function) from the VP sample `x` at level sigmas[0].

    `x` is what a CompVis model holds at that level (pure noise: a standard normal draw); the result
    is the VP sample at sigmas[-1] (clean latents when it is 0). `generator` is passed to the sampler
    (one torch.Generator, or a list with one per image); `options` are the sampler's own (eta, order...).
    """
    if isinstance(sampler, str):  # a registered sampler: its options are known (a custom function gets them as given)
        info = sampler_info(sampler)
        unknown = sorted(set(options) - set(info.options))
        if unknown:
            raise TypeError(f"sampler '{sampler}' takes no option {', '.join(map(repr, unknown))}; "
                            f"its options: {', '.join(info.options) or 'none'}")
    fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    check_sigmas(sigmas)
    x = fn(denoiser, x / vp_scale(sigmas[0]), sigmas, extra_args=extra_args, callback=callback, disable=disable,
           generator=generator, **options)
    return x * vp_scale(sigmas[-1])
