# %% [markdown]
# # Inpainting and super-resolution
#
# Inpainting: the text-conditioned shapes inpainting run (`*_shapes_inpainting`, or `$LDM_INPAINT_CKPT`), or, without
# one, the quickstart's text-to-image model inpainting by known-region replacement (any model, no retraining).
# Super-resolution: the 4x scikit-image LDM-SR run (`*_skimage_sr4_z8` / `*_skimage_sr4`, or `$LDM_SR_CKPT`).
# README, "Inpainting and super-resolution", says how to train them (10 and 30 minutes on 2 CPU cores).

# %%
import os

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.inpainting import shapes_object_box
from ldm.data.shapes import ShapesValidation
from ldm.files import to_uint8
from ldm.inpainting import inpaint, inpaint_mode
from ldm.metrics import reconstruction_metrics
from ldm.notebook import find_checkpoint, show
from ldm.runs import load_for_sampling
from ldm.superres import upscale
from ldm.util import instantiate_from_config

torch.set_num_threads(min(2, os.cpu_count() or 1))
INPAINT = (find_checkpoint(os.environ.get("LDM_INPAINT_CKPT"), "shapes_inpainting")
           or find_checkpoint(None, "quickstart_txt2img",
                              how_to_make="Make one with `make quickstart`; the inpainting cells are skipped."))
SR = (find_checkpoint(os.environ.get("LDM_SR_CKPT"), "skimage_sr4_z8")
      or find_checkpoint(None, "skimage_sr4", how_to_make="Train one as in the README (configs/ldm/skimage_sr4.yaml); "
                                                          "the super-resolution cells are skipped."))

# %% [markdown]
# ## Inpainting: erase the object, describe what should be there
# The mask is the box over the object's position; the same caption restores it, a changed caption replaces it.

# %%
if INPAINT:
    model, _ = load_for_sampling(INPAINT, device="cpu")
    print(f"{INPAINT}: inpainting mode '{inpaint_mode(model).value}'")
    data = ShapesValidation(num_samples=6)
    items = [data[i] for i in range(6)]
    x = torch.stack([torch.from_numpy(it["image"]) for it in items]).permute(0, 3, 1, 2)
    mask = torch.stack([torch.from_numpy(shapes_object_box(it["position"], 32)) for it in items])[:, None].float()
    same = [it["caption"] for it in items]
    changed = [c.replace("red", "blue") if "red" in c else c.replace(it["shape"], "circle" if it["shape"] != "circle"
               else "square") for c, it in zip(same, items)]
    out_same = inpaint(model, x, mask, same, steps=30, sampler="dpmpp_2m", seed=0)
    out_changed = inpaint(model, x, mask, changed, steps=30, sampler="dpmpp_2m", seed=0)
    masked = x * (1 - mask) + mask * torch.tensor([0.0, 0.0, 0.0])[:, None, None]
    show(np.concatenate([to_uint8(x), to_uint8(masked), to_uint8(out_same), to_uint8(out_changed)]), ncol=6,
         size=1.3, suptitle="rows: original | masked | same caption | changed caption")
    for c in changed:
        print("changed:", c)

# %% [markdown]
# ## 4x super-resolution of held-out crops
# The run's own held-out crops (coffee.png) and degradation. Rows: the 8x8 input (nearest), bicubic upsampling,
# the LDM's output, the 32x32 original. PSNR / SSIM against the original reward the mean-like answer (bicubic);
# the LDM draws plausible detail instead (benchmarks/RESULTS.md measures both on 200 crops).

# %%
if SR:
    sr_model, sr_cfg = load_for_sampling(SR, device="cpu")
    val = sr_cfg.data.params.validation  # the run's own held-out crops and degradation
    val.params.num_samples = 8
    ds = instantiate_from_config(val)
    hr = torch.stack([torch.from_numpy(ds[i]["image"]) for i in range(8)]).permute(0, 3, 1, 2)
    lr = torch.stack([torch.from_numpy(ds[i]["LR_image"]) for i in range(8)]).permute(0, 3, 1, 2)
    out = upscale(sr_model, lr, steps=50, sampler="ddim", seed=0)
    bicubic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    nearest = F.interpolate(lr, scale_factor=4, mode="nearest")
    show(np.concatenate([to_uint8(nearest), to_uint8(bicubic), to_uint8(out), to_uint8(hr)]), ncol=8, size=1.2,
         suptitle="rows: input (nearest) | bicubic | LDM-SR | original")
    for name, img in (("bicubic", bicubic), ("LDM-SR", out)):
        m = reconstruction_metrics(hr, img)
        print(f"{name:8s} PSNR {float(m['psnr']):.2f} dB  SSIM {float(m['ssim']):.3f}")
