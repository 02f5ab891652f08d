"""Config system: instantiate_from_config errors, YAML errors, missing keys, load_model_from_config."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import ConfigError, check_no_missing, instantiate_from_config, load_config, load_model_from_config


def test_instantiate_plain_and_sentinels():
    obj = instantiate_from_config({"target": "_helpers.Plain", "params": {"a": 1}})
    assert (obj.a, obj.b) == (1, 2)
    assert instantiate_from_config("__is_first_stage__") is None
    assert instantiate_from_config("__is_unconditional__") is None


def test_import_error_names_key_and_target():
    cfg = OmegaConf.create({"model": {"params": {"lossconfig": {"target": "ldm.nope.Missing"}}}})
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(cfg.model.params.lossconfig)
    assert "model.params.lossconfig.target" in str(e.value) and "ldm.nope" in str(e.value)
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        instantiate_from_config({"target": "ldm.util.Nope"})


def test_bad_params_are_reported_as_such():
    cfg = OmegaConf.create({"data": {"target": "_helpers.Plain", "params": {"a": 1, "c": 3}}})
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(cfg.data)
    msg = str(e.value)
    assert "data.params" in msg and "bad parameters" in msg and "_helpers.Plain" in msg and "Accepted: a, b" in msg


def test_error_inside_constructor_names_target():
    cfg = OmegaConf.create({"model": {"target": "ldm.modules.diffusionmodules.model.Encoder",
                                      "params": {"ch": 8, "num_res_blocks": 1, "in_channels": 3, "resolution": 31,
                                                 "z_channels": 2, "ch_mult": [1, 2]}}})
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(cfg.model)
    assert "model" in str(e.value) and "Encoder" in str(e.value) and "not divisible" in str(e.value)


def test_missing_target_key():
    with pytest.raises(ConfigError, match="target"):
        instantiate_from_config({"params": {}})


def test_yaml_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  target: x\n  params: [1, 2\n  other: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "line" in str(e.value)


def test_merge_left_to_right(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("x: 1\ny: {z: 2, w: 3}\n")
    b.write_text("y: {z: 5}\n")
    cfg = load_config([a, b])
    assert cfg.x == 1 and cfg.y.z == 5 and cfg.y.w == 3


def test_an_overlay_that_replaces_a_target_brings_its_own_params(tmp_path):
    """A config given after another that changes a node's target does not inherit the old target's params (they
    would be unexpected keyword arguments of the new class); the same target still merges its params."""
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text("m: {target: A, params: {size: 32, n: 5}}\nd: {t: {target: T, params: {k: 1}, other: 7}}\n"
                 "ref: ${m.params}\n")
    b.write_text("m: {target: B, params: {parts: [1, 2]}}\nd: {t: {target: T, params: {j: 2}}}\n")
    cfg = load_config([a, b])
    assert OmegaConf.to_container(cfg.m) == {"target": "B", "params": {"parts": [1, 2]}}
    assert OmegaConf.to_container(cfg.d.t) == {"target": "T", "params": {"k": 1, "j": 2}, "other": 7}
    assert cfg.ref == {"parts": [1, 2]}
    c.write_text("m: {target: B}\n")  # the same target again: params kept
    assert load_config([a, b, c]).m.params.parts == [1, 2]


def test_missing_mandatory_keys_listed():
    cfg = OmegaConf.create({"data": {"params": {"train": {"params": {"root": "???"}}}}})
    with pytest.raises(ConfigError, match=r"data\.params\.train\.params\.root"):
        check_no_missing(cfg)


def test_load_model_from_config_roundtrip(tmp_path, root):
    cfg = load_config(root / "configs/autoencoder/shapes_kl_f4.yaml")
    m = instantiate_from_config(cfg.model)
    from safetensors.torch import save_file
    save_file(m.state_dict(), str(tmp_path / "ae.safetensors"))
    m2 = load_model_from_config(cfg, tmp_path / "ae.safetensors")
    assert not m2.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
