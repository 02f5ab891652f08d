"""Safe checkpoint loading: weights-only pickles, refusal of code-carrying pickles, corrupt files, key reports."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked


class _Evil:
    """Unpickling this would create a marker file (it must never run)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ckpt_and_safetensors_roundtrip(tmp_path):
    m = torch.nn.Linear(3, 2)
    torch.save({"state_dict": m.state_dict(), "global_step": 7}, tmp_path / "a.ckpt")
    save_file(m.state_dict(), str(tmp_path / "a.safetensors"))
    for name in ("a.ckpt", "a.safetensors"):
        ck = load_checkpoint(tmp_path / name)
        m2 = torch.nn.Linear(3, 2)
        load_state_dict_checked(m2, ck, source=name)
        assert torch.equal(m2.weight, m.weight)


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _Evil(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "evil.ckpt")
    msg = str(e.value)
    assert "evil.ckpt" in msg and "allow_pickle=True" in msg and "--unsafe-load" in msg
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    m = torch.nn.Linear(30, 20)
    torch.save(m.state_dict(), tmp_path / "ok.ckpt")
    data = (tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.ckpt"):
        load_checkpoint(tmp_path / "trunc.ckpt")
    save_file(m.state_dict(), str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_checkpoint(tmp_path / "trunc.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_missing_and_unexpected_keys_reported(caplog):
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    sd = m.state_dict()
    sd.pop("1.bias")
    sd["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_checked(m, sd, source="x.ckpt")
    assert "1.bias" in str(e.value) and "2.weight" in str(e.value) and "x.ckpt" in str(e.value)
    with caplog.at_level(logging.WARNING):
        missing, unexpected = load_state_dict_checked(m, sd, strict=False, source="x.ckpt")
    assert missing == ["1.bias"] and unexpected == ["2.weight"]
    assert "1.bias" in caplog.text and "2.weight" in caplog.text


def test_shape_mismatch_names_key():
    m = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="weight"):
        load_state_dict_checked(m, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})


def test_position_ids_tolerated():
    m = torch.nn.Linear(2, 2)
    sd = dict(m.state_dict())
    sd["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    m2 = torch.nn.Linear(2, 2)
    missing, unexpected = load_state_dict_checked(m2, sd)  # strict, yet no error for the one known legacy key
    assert missing == [] and unexpected == []
    assert torch.equal(m2.weight, m.weight) and torch.equal(m2.bias, m.bias)


def test_init_from_ckpt_strict_except_tolerated_prefixes(tmp_path):
    from ldm.checkpoint import init_from_ckpt
    m = torch.nn.Module()
    m.net, m.loss = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("loss.")}
    torch.save(sd, tmp_path / "a.ckpt")
    init_from_ckpt(m, tmp_path / "a.ckpt", tolerate_prefixes=("loss.",))  # the loss is not needed to run
    sd.pop("net.bias")
    torch.save(sd, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match="net.bias"):
        init_from_ckpt(m, tmp_path / "b.ckpt", tolerate_prefixes=("loss.",))
