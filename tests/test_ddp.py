"""DDP on 2 CPU processes (gloo): EMA and scale_by_std agree across ranks, and the learning-rate rule is exact."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.minilm
def test_ema_and_scale_factor_identical_on_both_ranks(tmp_path):
    from safetensors.torch import save_file
    from ldm.util import instantiate_from_config, load_config
    ae = instantiate_from_config(load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml").model)
    save_file(ae.state_dict(), str(tmp_path / "ae.safetensors"))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keep packages added there
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path),
                           str(tmp_path / "ae.safetensors")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == 4
    assert float(r0["scale_factor"]) != 1.0 and torch.equal(r0["scale_factor"], r1["scale_factor"])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    for k in r0["ema"]:
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    # one EMA update per optimizer step (4), not per micro-batch (8)
    assert int(r0["ema"]["num_updates"]) == 4
    # the EMA lags the trained weights (it averages over the steps)
    shadow = {k.replace(".", ""): k for k in r0["weights"]}
    assert any(not torch.equal(r0["ema"][s], r0["weights"][k]) for s, k in shadow.items() if s in r0["ema"])


def _train(tmp_path, name: str, devices: int, batch: int, strategy: str = "ddp") -> list[dict]:
    from safetensors.torch import save_file
    from ldm.util import instantiate_from_config, load_config
    ae_path = tmp_path / "ae.safetensors"
    if not ae_path.exists():
        torch.manual_seed(1)
        ae = instantiate_from_config(load_config(ROOT / "configs/autoencoder/shapes_kl_f4.yaml").model)
        save_file(ae.state_dict(), str(ae_path))
    out = tmp_path / name
    out.mkdir()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_lr_worker.py"), str(out), str(ae_path),
                           str(devices), str(batch), strategy], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return _train(tmp_path_factory.mktemp("one"), "one", devices=1, batch=4)[0]


@pytest.mark.minilm
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_at_batch_b_train_like_one_at_batch_2b(strategy, one_process, tmp_path):
    """The learning-rate rule is exact: with noise_seed (draws made for the global batch) and the learning rate
    scaled by batch x devices, 2 processes at batch 2 and 1 process at batch 4 reach the same weights, EMA and
    scale_factor after 3 steps (within float tolerance); both ranks hold identical copies (FSDP: gathered from
    the shards each rank holds)."""
    two = _train(tmp_path, "two", devices=2, batch=2, strategy=strategy)
    one = one_process
    assert two[0]["sharded"] == two[1]["sharded"] == (strategy == "fsdp")
    for key in ("weights", "ema"):
        for k in two[0][key]:
            assert torch.equal(two[0][key][k], two[1][key][k]), k
    torch.testing.assert_close(two[0]["scale_factor"], one["scale_factor"], rtol=1e-5, atol=0)
    for key in ("weights", "ema"):
        for k, w in one[key].items():
            torch.testing.assert_close(two[0][key][k], w, rtol=1e-4, atol=1e-6, msg=k)
    assert one["steps"] == two[0]["steps"] == 3
