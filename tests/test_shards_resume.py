"""Streamed tar shards that resume exactly (ldm.data.shards, `resumable: true`): per rank and worker, a run stopped
after S batches and resumed at S reads what an uninterrupted run reads, and an epoch reads every sample once."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_shards  # noqa: E402

from ldm.data.shards import worker_shards  # noqa: E402
from ldm.data.webdata import WebDataModuleFromConfig  # noqa: E402

SHARDS, PER_SHARD = 8, 3


def write_shards(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for k in range(SHARDS * PER_SHARD):
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(src / f"im{k:03d}.png")
        (src / f"im{k:03d}.txt").write_text(f"c{k:03d}")
    out = tmp_path / "shards"
    assert make_shards.main(["--indir", str(src), "--out", str(out), "--maxcount", str(PER_SHARD)]) == 0
    return out


def module(out: Path, workers: int) -> WebDataModuleFromConfig:
    return WebDataModuleFromConfig(tar_base=str(out), batch_size=2, num_workers=workers, train={
        "shards": f"shard-{{000000..{SHARDS - 1:06d}}}.tar", "image_key": "png", "resumable": True, "seed": 5})


def captions(loader, n: int) -> list[list[str]]:
    out = []
    for batch in loader:
        out.append(list(batch["txt"]))
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


def test_a_stopped_and_resumed_stream_reads_what_an_uninterrupted_one_does_per_rank_and_worker(tmp_path):
    out = write_shards(tmp_path)
    epoch0 = Counter()
    for rank in range(2):
        def loader(start: int):
            dm = module(out, workers=2)
            ds = dm.make_dataset("train")
            ds.rank, ds.world, ds.start = rank, 2, start
            return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        whole = captions(loader(0), 12)
        stopped = captions(loader(0), 5)
        resumed = captions(loader(5), 7)
        assert stopped + resumed == whole  # nothing repeated, nothing skipped
        # each worker's first pass: exactly the samples of its shards, once
        for worker in range(2):
            mine = [c for j, b in enumerate(whole) if j % 2 == worker for c in b]
            shards = worker_shards(sorted(str(p) for p in out.glob("*.tar")), 5, 0, rank, 2, worker, 2)
            first_pass = mine[:len(shards) * PER_SHARD]
            assert len(set(first_pass)) == len(first_pass) == len(shards) * PER_SHARD
            epoch0.update(first_pass)
    assert epoch0 == Counter(f"c{k:03d}" for k in range(SHARDS * PER_SHARD))  # every sample once over the ranks


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["txt"]))
        return (self.w * batch["png"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(out: Path, tmp_path: Path, steps: int, ckpt=None, name="run") -> Recorder:
    model = Recorder()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path / name,
                         enable_checkpointing=False)
    trainer.fit(model, datamodule=module(out, workers=2), ckpt_path=ckpt)
    if ckpt is None:
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
    return model


def test_lightning_resumes_the_stream_at_the_saved_step(tmp_path):
    out = write_shards(tmp_path)
    whole = fit(out, tmp_path, 9, name="whole").seen
    first = fit(out, tmp_path, 5, name="first").seen  # odd: the resumed loader's worker 0 continues worker 1
    rest = fit(out, tmp_path, 9, ckpt=tmp_path / "first.ckpt", name="rest").seen
    assert first + rest == whole


def test_a_resume_with_other_workers_is_refused_by_name(tmp_path):
    import pytest

    from ldm.util import ConfigError
    out = write_shards(tmp_path)
    saved = module(out, workers=2).state_dict()
    assert saved == {"num_workers": 2, "world_size": 1, "seed": 5, "shards": SHARDS}
    with pytest.raises(ConfigError, match=r"num_workers=2 \(now 3\)"):
        module(out, workers=3).load_state_dict(saved)
    module(out, workers=2).load_state_dict(saved)
