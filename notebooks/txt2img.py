# %% [markdown]
# # Text-to-image: samplers, step counts, guidance, the denoising trajectory
#
# Loads the quickstart's text-to-image run (`make quickstart`), or the checkpoint in `$LDM_TXT2IMG_CKPT`
# (its config is read from the run directory, or from `$LDM_TXT2IMG_CONFIG`). Everything runs on the CPU in
# a few minutes with the 32-pixel shapes model.

# %%
import os
import time

import numpy as np
import torch

from ldm.generation import generate, sampling_scope
from ldm.notebook import find_checkpoint, sample_settings, show, trajectory
from ldm.runs import load_for_sampling
from ldm.sampling import EVALS_PER_STEP

torch.set_num_threads(min(2, os.cpu_count() or 1))
CKPT = find_checkpoint(os.environ.get("LDM_TXT2IMG_CKPT"), "quickstart_txt2img",
                       how_to_make="Make one with `make quickstart` (about 15 minutes on 2 CPU cores), or set "
                                   "LDM_TXT2IMG_CKPT to a checkpoint; the cells below are skipped until then.")
READY = CKPT is not None
if READY:
    model, config = load_for_sampling(CKPT, os.environ.get("LDM_TXT2IMG_CONFIG"), device="cpu")
    print(f"{CKPT}: {sum(p.numel() for p in model.model.parameters()) / 1e6:.1f} M UNet parameters, "
          f"latents {model.channels}x{model.image_size}x{model.image_size}, guidance scale {model.guidance_scale}")

# %% [markdown]
# ## A prompt grid with several samplers and step counts
# The same per-image seeds for every setting, so differences come from the sampler alone.

# %%
PROMPTS = ["a large red circle in the center", "a small blue square in the top left",
           "a large yellow triangle in the bottom right", "a small green circle in the top right"]
SETTINGS = [dict(sampler="ddim", steps=50, scale=3.0), dict(sampler="ddim", steps=10, scale=3.0),
            dict(sampler="dpmpp_2m", steps=10, scale=3.0), dict(sampler="heun", steps=10, scale=3.0),
            dict(sampler="euler_ancestral", steps=20, scale=3.0), dict(sampler="plms", steps=20, scale=3.0)]
if READY:
    runs = sample_settings(model, PROMPTS, SETTINGS, seed=0)
    grid = np.concatenate([r.images for r in runs])
    show(grid, titles=[f"{r.label.split(',')[0]}" if k == 0 else "" for r in runs for k in range(len(PROMPTS))],
         ncol=len(PROMPTS), suptitle="rows: " + " | ".join(r.label.split(",")[0] for r in runs))

# %% [markdown]
# ## Timing per sampler
# Seconds per image and per network evaluation (guidance doubles the batch, not the evaluations).

# %%
if READY:
    print(f"{'setting':32s} {'s/image':>8s} {'evals':>6s} {'ms/eval':>8s}")
    for r in runs:
        evals = r.extra["steps"] * EVALS_PER_STEP.get(r.extra["sampler"], 1)
        print(f"{r.label.split(',')[0]:32s} {r.seconds / len(PROMPTS):8.3f} {evals:6d} "
              f"{1000 * r.seconds / evals:8.1f}")

# %% [markdown]
# ## Guidance scale sweep
# One prompt and seed, classifier-free guidance from 1 (none) upwards.

# %%
SCALES = [1.0, 2.0, 3.0, 5.0, 8.0]
if READY:
    sweep = sample_settings(model, [PROMPTS[0]], [dict(sampler="dpmpp_2m", steps=20, scale=s) for s in SCALES])
    show(np.concatenate([r.images for r in sweep]), titles=[f"scale {s}" for s in SCALES], size=1.8)

# %% [markdown]
# ## The denoising trajectory
# The model's estimate of the clean image (x0) at every fourth DDIM step, decoded.

# %%
if READY:
    steps, images = trajectory(model, PROMPTS[1], steps=24, sampler="ddim", scale=3.0, every=4)
    show(images, titles=[f"step {i + 1}" for i in steps], size=1.6)

# %% [markdown]
# ## Inspecting latents
# A sample's latent channels as images, and their statistics (the first stage's `scale_factor` makes them
# roughly unit variance).

# %%
if READY:
    with sampling_scope(model):
        cond = model.conditioning(prompts=[PROMPTS[2]])
        z = generate(model, cond, 1, steps=20, sampler="dpmpp_2m", scale=3.0, generator=torch.Generator().manual_seed(0),
                     decode=False)
    lat = z[0].cpu()
    print("per-channel mean", [round(float(v), 3) for v in lat.mean((1, 2))],
          "std", [round(float(v), 3) for v in lat.std((1, 2))], "scale_factor", float(model.scale_factor))
    norm = ((lat - lat.amin((1, 2), keepdim=True)) / (lat.amax((1, 2), keepdim=True) - lat.amin((1, 2), keepdim=True)
                                                        + 1e-8) * 255).byte()
    show(norm[..., None].numpy(), titles=[f"channel {k}" for k in range(len(lat))], size=1.6)
