# %% [markdown]
# # Class-conditional LDM on MNIST-5k: samples per class, guidance scale against class accuracy
#
# Uses the newest `*_mnist_class_cond` run (or `$LDM_CLASS_CKPT`); with none, trains the MNIST KL-f4 autoencoder
# and then the class-conditional LDM briefly here (a few minutes on 2 CPU cores: enough for recognisable digits,
# not for good ones). A small classifier trained here on MNIST-5k reads the samples' classes back.

# %%
import os
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ldm.data.bundled import MNIST5k
from ldm.files import to_uint8
from ldm.generation import generate, generators, sampling_scope
from ldm.notebook import find_checkpoint, show, train_briefly
from ldm.runs import load_for_sampling

torch.set_num_threads(min(2, os.cpu_count() or 1))
AE_STEPS, LDM_STEPS = int(os.environ.get("LDM_NB_AE_STEPS", 600)), int(os.environ.get("LDM_NB_LDM_STEPS", 1500))
CKPT = find_checkpoint(os.environ.get("LDM_CLASS_CKPT"), "mnist_class_cond")
if CKPT is None:
    ae_ckpt = find_checkpoint(None, "mnist_ae") or train_briefly(
        "configs/autoencoder/mnist_kl_f4.yaml", "mnist_ae", [f"lightning.trainer.max_steps={AE_STEPS}"])
    CKPT = train_briefly("configs/ldm/mnist_class_cond.yaml", "mnist_class_cond",
                         [f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}",
                          f"lightning.trainer.max_steps={LDM_STEPS}", "lightning.trainer.val_check_interval=500"])
model, config = load_for_sampling(CKPT, os.environ.get("LDM_CLASS_CONFIG"), device="cpu")
print(f"{CKPT}: {sum(p.numel() for p in model.model.parameters()) / 1e6:.2f} M UNet parameters")


def sample_classes(labels, scale, steps=20, seed=0):
    """Decoded samples (uint8) for class `labels`, per-image seeds seed + k."""
    labels = torch.as_tensor(labels)
    gens = generators([seed + k for k in range(len(labels))], model.device)
    with sampling_scope(model):
        cond = model.conditioning(labels=labels, guidance=scale != 1.0)
        return to_uint8(generate(model, cond, len(labels), steps=steps, sampler="dpmpp_2m", scale=scale,
                                 generator=gens))


# %% [markdown]
# ## Samples per class (rows: 0 to 9)

# %%
labels = np.repeat(np.arange(10), 8)
images = sample_classes(labels, scale=model.guidance_scale)
show(images, ncol=8, size=0.9, suptitle=f"guidance scale {model.guidance_scale}")

# %% [markdown]
# ## A classifier to read the classes back
# Logistic regression on the pixels of MNIST-5k's training split (the LDM's training data), checked on its
# validation split.

# %%
def pixels(ds):
    return np.stack([ds[i]["image"][..., 0].ravel() for i in range(len(ds))]), np.array(
        [ds[i]["class_label"] for i in range(len(ds))])


x_train, y_train = pixels(MNIST5k(split="train", size=32))
x_val, y_val = pixels(MNIST5k(split="validation", size=32))
clf = LogisticRegression(max_iter=300, C=0.1).fit(x_train, y_train)
print(f"classifier accuracy on held-out real digits: {clf.score(x_val, y_val):.3f}")

# %% [markdown]
# ## Guidance scale against class accuracy
# 10 samples per class at each scale; accuracy = how often the classifier reads the asked class.

# %%
SCALES = [1.0, 1.5, 2.0, 3.0, 5.0]
labels = np.repeat(np.arange(10), 10)
rows = []
for s in SCALES:
    t0 = time.perf_counter()
    imgs = sample_classes(labels, scale=s, seed=100)
    feats = imgs[..., 0].reshape(len(imgs), -1).astype(np.float32) / 127.5 - 1.0
    acc = float((clf.predict(feats) == labels).mean())
    rows.append((s, acc, time.perf_counter() - t0))
    print(f"scale {s:4.1f}: class accuracy {acc:.2f}  ({time.perf_counter() - t0:.1f} s for 100 samples)")

# %%
import matplotlib.pyplot as plt

plt.figure(figsize=(4, 3))
plt.plot([r[0] for r in rows], [r[1] for r in rows], "o-")
plt.xlabel("guidance scale")
plt.ylabel("class accuracy (classifier)")
plt.ylim(0, 1)
plt.grid(alpha=0.3)
plt.show()
