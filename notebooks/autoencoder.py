# %% [markdown]
# # The first stage: reconstructions, latents, scale factor, interpolation
#
# Loads the quickstart's shapes autoencoder (KL-f4, `make quickstart`) or the checkpoint in `$LDM_AE_CKPT`; with
# neither, trains one briefly here (300 steps, about a minute on 2 CPU cores).

# %%
import os

import numpy as np
import torch

from ldm.data.shapes import ShapesValidation
from ldm.files import to_uint8
from ldm.metrics import reconstruction_metrics
from ldm.notebook import find_checkpoint, show, train_briefly
from ldm.runs import load_for_sampling

torch.set_num_threads(min(2, os.cpu_count() or 1))
CKPT = find_checkpoint(os.environ.get("LDM_AE_CKPT"), "quickstart_ae")
if CKPT is None:
    CKPT = train_briefly("configs/autoencoder/shapes_kl_f4.yaml", "notebook_ae",
                         ["lightning.trainer.max_steps=300", "model.params.scheduler_config.params.max_decay_steps=300"])
ae, config = load_for_sampling(CKPT, os.environ.get("LDM_AE_CONFIG"), device="cpu")
f = 2 ** (len(ae.encoder.down) - 1)
print(f"{CKPT}: {sum(p.numel() for p in ae.parameters()) / 1e6:.2f} M parameters, downsampling factor {f}, "
      f"{ae.embed_dim} latent channels")

# %% [markdown]
# ## Reconstructions, PSNR and SSIM on held-out images

# %%
data = ShapesValidation(num_samples=64)
x = torch.stack([torch.from_numpy(data[i]["image"]) for i in range(64)]).permute(0, 3, 1, 2)
with torch.no_grad():
    posterior = ae.encode(x)
    rec = ae.decode(posterior.mode())
m = reconstruction_metrics(x, rec)
print(f"PSNR {float(m['psnr']):.2f} dB, SSIM {float(m['ssim']):.4f} (64 validation images)")
show(np.concatenate([to_uint8(x[:8]), to_uint8(rec[:8])]), ncol=8,
     suptitle="top: input, bottom: reconstruction")

# %% [markdown]
# ## The latent channels as images

# %%
z = posterior.mode()
lat = z[:4]
norm = (lat - lat.amin((2, 3), keepdim=True)) / (lat.amax((2, 3), keepdim=True) - lat.amin((2, 3), keepdim=True) + 1e-8)
tiles = (norm * 255).byte().reshape(-1, *lat.shape[2:])[..., None].numpy()
show(tiles, titles=[f"image {k // lat.shape[1]}, channel {k % lat.shape[1]}" for k in range(len(tiles))],
     ncol=lat.shape[1])

# %% [markdown]
# ## The latent statistics behind `scale_factor`
# A latent diffusion model wants latents of roughly unit variance: `scale_factor = 1 / std(z)` over the
# training data (CompVis' `scale_by_std`; Stable Diffusion's 0.18215 was computed this way for its KL-f8).

# %%
print("per-channel mean", [round(float(v), 3) for v in z.mean((0, 2, 3))])
print("per-channel std ", [round(float(v), 3) for v in z.std((0, 2, 3))])
print(f"overall std {float(z.std()):.4f} -> scale_factor = 1 / std = {1 / float(z.std()):.4f}")
print(f"posterior std (mean over latents): {float(posterior.std.mean()):.4f}")

# %% [markdown]
# ## Interpolation in latent space
# Linear interpolation between the latents of two images, decoded.

# %%
a, b = z[0:1], z[5:6]
ts = np.linspace(0, 1, 8)
with torch.no_grad():
    frames = torch.cat([ae.decode((1 - t) * a + t * b) for t in ts])
show(to_uint8(frames), titles=[f"t={t:.2f}" for t in ts], ncol=8)
