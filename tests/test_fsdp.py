"""FSDP (ldm.parallel: FSDP2 through Lightning) from main.py on 2 CPU processes (gloo): it trains with the UNet and a
trainable conditioner sharded, logs images, resumes at the saved step, and its checkpoint holds the gathered weights
in the plain layout every loader reads."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _config(tmp_path: Path) -> Path:
    from safetensors.torch import save_file
    cfg = load_config(ROOT / "configs/ldm/mnist_class_cond.yaml")
    p = cfg.model.params
    torch.manual_seed(0)
    p.first_stage_config.params.ckpt_path = None
    save_file(instantiate_from_config(p.first_stage_config).state_dict(), str(tmp_path / "ae.safetensors"))
    p.first_stage_config.params.ckpt_path = str(tmp_path / "ae.safetensors")
    u = p.unet_config.params
    u.model_channels, u.num_head_channels, u.context_dim = 32, 16, 16
    p.cond_stage_config.params.embed_dim = 16
    assert p.cond_stage_trainable  # the class embedder trains: it is sharded too
    cfg.data.params.batch_size = 4
    cfg.data.params.train = {"target": "ldm.data.bundled.MNIST5k", "params": {"split": "train", "size": 32}}
    cfg.lightning.trainer.limit_val_batches = 0
    cfg.lightning.callbacks.image_logger.params.update(batch_frequency=2, disabled=False, max_images=2)
    cfg.lightning.callbacks.image_logger.params.log_images_kwargs = {"ddim_steps": 2}
    path = tmp_path / "tiny.yaml"
    OmegaConf.save(cfg, path)
    return path


def _main(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(ROOT / "main.py")] + args + [
        "lightning.trainer.enable_progress_bar=false"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


FSDP = ["lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2", "lightning.trainer.max_steps=2"]


@pytest.mark.slow
def test_fsdp_through_main_trains_resumes_and_saves_the_gathered_weights(tmp_path):
    from ldm.checkpoint import load_checkpoint
    from ldm.runs import load_for_sampling
    dump = tmp_path / "dump"
    _main(["--base", str(_config(tmp_path)), "-t", "-n", "fsdp", "-l", str(tmp_path), "lightning.trainer.strategy=fsdp",
           "lightning.callbacks.dump.target=ddp_worker.Dump", f"lightning.callbacks.dump.params.out={dump}"] + FSDP,
          tmp_path)
    run = next(tmp_path.glob("*_fsdp"))
    ck = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 2
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["sharded"] and ranks[1]["sharded"]  # each rank held shards while training
    sd = ck["state_dict"]
    for prefix, key in (("model.", "weights"), ("model_ema.", "ema")):
        for k, v in ranks[0][key].items():
            assert torch.equal(sd[prefix + k], v) and torch.equal(ranks[1][key][k], v), k
    assert list((run / "images" / "train").glob("*.png"))  # image logging ran its collective forwards on both ranks
    # the plain layout: it loads for sampling like any checkpoint
    model, _ = load_for_sampling(run / "checkpoints" / "last.ckpt", device="cpu")
    torch.testing.assert_close(model.model.state_dict()["diffusion_model.out.2.weight"],
                               sd["model.diffusion_model.out.2.weight"], rtol=0, atol=0)
    # resume: the sharded run continues at the saved step
    time.sleep(max(0.0, 1.05 - (time.time() % 1.0)))
    _main(["-r", str(run), "-t", "lightning.trainer.max_steps=4"], tmp_path)
    ck4 = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ck4["global_step"] == 4
    w2, w4 = sd["model.diffusion_model.out.2.weight"], ck4["state_dict"]["model.diffusion_model.out.2.weight"]
    assert not torch.equal(w2, w4)


@pytest.fixture
def one_process(tmp_path):
    """ldm.parallel.FSDP's sharding settings on a 1-process gloo mesh (in this test process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from ldm.parallel import FSDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    strategy = FSDP(mixed_precision="bf16-mixed")
    strategy._device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    yield strategy
    dist.destroy_process_group()


def tiny_ldm(**params):
    cfg = load_config(ROOT / "configs/ldm/mnist_class_cond.yaml")
    p = cfg.model.params
    p.first_stage_config.params.ckpt_path = None
    p.unet_config.params.model_channels, p.unet_config.params.num_head_channels = 32, 16
    p.update(params)
    return instantiate_from_config(cfg.model)


def test_fsdp_mixed_precision_gathers_bf16_and_keeps_fp32_master_weights(one_process):
    from torch.distributed.tensor import DTensor
    from ldm.parallel import shard_diffusion_model
    model = tiny_ldm()
    shard_diffusion_model(model, one_process)
    block = model.model.diffusion_model.input_blocks[1]
    seen = []
    block.register_forward_pre_hook(lambda m, a: seen.append(next(m.parameters()).dtype))
    params = list(model.model.parameters())
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in params)  # sharded fp32 master weights
    assert all(isinstance(b, DTensor) for n, b in model.model_ema.named_buffers() if n not in ("decay", "num_updates"))
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([10, 500])
    c = model.get_learned_conditioning(torch.tensor([1, 2]))
    loss = model.apply_model(x, t, c).float().pow(2).mean()
    loss.backward()
    assert seen == [torch.bfloat16]  # gathered in bf16 for the forward
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params if p.requires_grad)
    model.model_ema(model.model)  # the EMA update runs on the shards


def test_fsdp_refuses_trainable_weights_it_would_not_synchronise(one_process):
    from ldm.parallel import FSDP, check_shardable, shard_diffusion_model, strategy_from_config
    from ldm.util import ConfigError
    model = tiny_ldm(learn_logvar=True)  # a trainable weight of the LightningModule itself, outside the UNet
    check_shardable(model)
    with pytest.raises(ConfigError, match="AutoencoderKL has none"):
        check_shardable(model.first_stage_model)

    with pytest.raises(ConfigError, match="logvar"):
        shard_diffusion_model(model, one_process)
    assert isinstance(strategy_from_config("fsdp"), FSDP)
    assert strategy_from_config("ddp") == "ddp"
    built = strategy_from_config({"target": "ldm.parallel.FSDP", "params": {"mixed_precision": "bf16-mixed"}})
    assert built.param_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="mixed_precision"):
        FSDP(mixed_precision="int8")
    with pytest.raises(ConfigError, match="state_dict|target"):
        strategy_from_config({"target": "ldm.parallel.FSDP", "params": {"state_dict": "partial"}})


@pytest.mark.slow  # two runs of 2 processes through main.py: about a minute
def test_sharded_fsdp_checkpoints_export_through_convert_and_resume(tmp_path):
    """state_dict: sharded writes a torch.distributed.checkpoint folder per save; convert.py turns it into a plain
    checkpoint equal to the gathered weights; main.py -r resumes from it at the saved step."""
    import convert
    from ldm.checkpoint import is_sharded_checkpoint, load_checkpoint
    dump = tmp_path / "dump"
    _main(["--base", str(_config(tmp_path)), "-t", "-n", "sh", "-l", str(tmp_path),
           "lightning.trainer.strategy.target=ldm.parallel.FSDP", "lightning.trainer.strategy.params.state_dict=sharded",
           "lightning.callbacks.dump.target=ddp_worker.Dump", f"lightning.callbacks.dump.params.out={dump}"] + FSDP,
          tmp_path)
    run = next(tmp_path.glob("*_sh"))
    last = run / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(last) and len(list(last.glob("*.distcp"))) == 2  # one file per rank
    assert convert.main(["--ckpt", str(last), "--out", str(tmp_path / "plain.ckpt")]) == 0
    plain = load_checkpoint(tmp_path / "plain.ckpt")["state_dict"]
    gathered = torch.load(dump / "rank0.pt", weights_only=True)
    for prefix, key in (("model.", "weights"), ("model_ema.", "ema")):
        for k, v in gathered[key].items():
            assert torch.equal(plain[prefix + k], v), k
    time.sleep(max(0.0, 1.05 - (time.time() % 1.0)))
    _main(["-r", str(run), "-t", "lightning.trainer.max_steps=4"], tmp_path)
    assert load_checkpoint(last)["global_step"] == 4


def test_a_sharded_checkpoint_naming_code_is_refused(tmp_path):
    """The folder's metadata is a pickle: a global outside torch.distributed.checkpoint's records is refused unread."""
    import pickle
    from ldm.checkpoint import CheckpointError, load_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="refusing to load.*system"):
        load_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()
    # a well-formed folder whose non-tensor entry (where the optimizer's settings live) is such a pickle
    import warnings
    from torch.distributed.checkpoint import save
    from ldm.checkpoint import check_sharded_checkpoint
    folder = tmp_path / "entry.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save({"state_dict": {"w": torch.ones(2)}, "optimizer_0": {"param_groups": Evil()}}, checkpoint_id=folder,
             no_dist=True)
    assert torch.equal(load_checkpoint(folder)["state_dict"]["w"], torch.ones(2))  # the tensors alone are read
    with pytest.raises(CheckpointError, match="refusing to resume.*optimizer_0"):
        check_sharded_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()
