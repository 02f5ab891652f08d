"""DreamBooth: instance and class images in one batch, the prior-preservation loss, and the script that makes the
class images with the base model (cached) and trains with LoRA or in full."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import InputError
from ldm.core.denoiser import Denoiser, DiscreteSchedule
from ldm.core.scaling import scaling_for
from ldm.modules.diffusionmodules.loss import DiffusionLoss, SimpleWeighting, UniformTimesteps
from ldm.modules.model_inputs import PRIOR_FLAG, prior_weights, with_prior

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_prior_preservation_loss_is_the_instance_mean_plus_the_weighted_class_mean():
    batch = {"image": torch.randn(2, 8, 8, 3), "caption": ["sks a", "sks b"],
             "prior_image": torch.randn(3, 8, 8, 3), "prior_caption": ["a", "b", "c"], "file_path_": ["x", "y"]}
    merged = with_prior(batch)
    assert merged["image"].shape[0] == 5 and merged["caption"] == ["sks a", "sks b", "a", "b", "c"]
    assert merged[PRIOR_FLAG].tolist() == [False, False, True, True, True]
    assert with_prior({"image": batch["image"]}).keys() == {"image"}  # an ordinary batch: as it is
    loss = DiffusionLoss(scaling_for("eps"), UniformTimesteps(1000), SimpleWeighting())
    alphas = torch.linspace(0.99, 0.05, 1000)
    x0, t, noise = torch.randn(5, 4, 4, 4), torch.randint(0, 1000, (5,)), torch.randn(5, 4, 4, 4)
    net = torch.nn.Conv2d(4, 4, 1)
    denoiser = Denoiser(lambda x, tt, c: net(x), scaling_for("eps"), DiscreteSchedule(alphas ** 2))

    def step(idx, weights=None):
        return loss(denoiser, x0[idx], None, t=t[idx], noise=noise[idx], sample_weights=weights)[0]

    total = step(slice(None), prior_weights(merged, 0.5))
    expected = step(slice(0, 2)) + 0.5 * step(slice(2, 5))
    assert torch.allclose(total, expected, rtol=1e-6), (total, expected)
    assert prior_weights({"image": x0}, 0.5) is None


def _images(folder: Path, n: int, color: tuple[int, int, int], side: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        arr = np.zeros((side, side, 3), np.uint8)
        arr[4 + k:20 + k, 6:22] = color
        Image.fromarray(arr).save(folder / f"{k}.png")
    return folder


def test_dreambooth_dataset_pairs_each_instance_item_with_a_class_item(tmp_path):
    from ldm.data.dreambooth import DreamBoothDataset
    inst, cls = _images(tmp_path / "inst", 2, (255, 0, 0)), _images(tmp_path / "cls", 3, (0, 0, 255))
    ds = DreamBoothDataset(inst, "a sks square", cls, "a square", size=16, min_class_images=3)
    assert len(ds) == 3
    item = ds[2]
    assert item["caption"] == "a sks square" and item["prior_caption"] == "a square"
    assert item["image"].shape == (16, 16, 3) and item["prior_image"].shape == (16, 16, 3)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    with pytest.raises(InputError, match="scripts/dreambooth.py"):
        DreamBoothDataset(inst, "a sks square", cls, "a square", size=16, min_class_images=10)
    with pytest.raises(InputError, match="class_prompt"):
        DreamBoothDataset(inst, "a sks square", cls, None)


def test_shared_step_weights_the_class_items(tiny_run):
    from ldm.runs import load_for_sampling
    model, _ = load_for_sampling(tiny_run / "checkpoints" / "last.ckpt", device="cpu")
    seen = {}

    def capture(*args, sample_weights=None, **kw):
        seen["w"] = sample_weights
        return torch.tensor(0.0), {}

    model.loss_fn = capture
    batch = {"image": torch.rand(1, 32, 32, 3) * 2 - 1, "caption": ["a sks square"],
             "prior_image": torch.rand(2, 32, 32, 3) * 2 - 1, "prior_caption": ["a square", "a square"]}
    model.prior_loss_weight = 0.8
    model.shared_step(with_prior(batch))
    assert seen["w"].tolist() == pytest.approx([1.0, 0.4, 0.4])


@pytest.mark.parametrize("full", [False, True])
def test_dreambooth_script_makes_class_images_once_and_trains(tiny_run, tmp_path, full):
    import dreambooth
    from test_lora import _perturbed_base

    from ldm.checkpoint import load_checkpoint
    base = _perturbed_base(tiny_run, tmp_path)
    config = sorted((tiny_run / "configs").glob("*-project.yaml"))[-1]
    inst = _images(tmp_path / "inst", 3, (0, 200, 0))
    args = ["--ckpt", str(base), "--config", str(config), "--instance_dir", str(inst), "--instance_prompt",
            "a sks square", "--class_prompt", "a green square", "--class_dir", str(tmp_path / "cls"),
            "--num_class_images", "2", "--sample_batch", "2", "--steps", "2", "--max_steps", "2",
            "--logdir", str(tmp_path / "logs"), "--name", "db", "lightning.trainer.enable_progress_bar=false"]
    assert dreambooth.main(args + (["--full"] if full else [])) == 0
    made = sorted((tmp_path / "cls").glob("*.png"))
    assert len(made) == 2
    stamp = made[0].stat().st_mtime_ns
    opt, _ = dreambooth.get_parser().parse_known_args(args)
    assert dreambooth.make_class_images(opt, config) == 0 and made[0].stat().st_mtime_ns == stamp  # cached
    run = next((tmp_path / "logs").glob("*_db"))
    sd = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(".lora_A." in k for k in sd) is not full
    assert any(k.startswith("first_stage_model.") for k in sd) is full  # LoRA runs keep the base out
    bad = list(args)
    bad[bad.index("--instance_dir") + 1] = str(tmp_path / "nothing")
    assert dreambooth.main(bad) == 2
