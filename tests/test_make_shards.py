"""scripts/make_shards.py: a captioned folder packed into WebDataset shards that the SD2 data module reads back."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_shards  # noqa: E402

from ldm.data.webdata import WebDataModuleFromConfig  # noqa: E402


def test_shards_hold_every_readable_image_with_caption_and_metadata(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(7):
        Image.fromarray(np.full((20 + k, 30, 3), 30 * k, np.uint8)).save(src / f"im{k}.jpg")
        (src / f"im{k}.txt").write_text(f"caption {k}")
    (src / "im3.json").write_text(json.dumps({"aesthetic": 6.5}))
    (src / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    (src / "bad.txt").write_text("never read")
    out = tmp_path / "shards"
    assert make_shards.main(["--indir", str(src), "--out", str(out), "--maxcount", "3"]) == 1  # one left out
    err = capsys.readouterr()
    assert "wrote 7 samples in 3 shard(s)" in err.out and "bad.jpg" in err.err
    dm = WebDataModuleFromConfig(tar_base=str(out), batch_size=1, num_workers=0, multinode=False,
                                 train={"shards": "shard-{000000..000002}.tar", "repeat": False})
    seen = {}
    for batch in dm.train_dataloader():
        for caption, meta, image in zip(batch["txt"], batch["json"], batch["jpg"]):
            seen[caption] = (meta, tuple(image.shape))
    assert set(seen) == {f"caption {k}" for k in range(7)}
    meta, shape = seen["caption 3"]
    assert meta["aesthetic"] == 6.5 and meta["original_height"] == 23 and meta["original_width"] == 30
    assert shape == (23, 30, 3)
    # a second run does not overwrite the shards unless asked
    assert make_shards.main(["--indir", str(src), "--out", str(out)]) == 2
    assert "already holds 3 shard(s)" in capsys.readouterr().err
    assert make_shards.main(["--indir", str(src), "--out", str(out), "--overwrite"]) == 1
    assert len(list(out.glob("shard-*.tar"))) == 1


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert make_shards.main(["--indir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "image directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_shards.main(["--out", str(tmp_path)])
