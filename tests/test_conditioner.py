"""Conditioning as a list of embedders: sgm's `conditioner_config` (an SDXL-shaped list: two text encoders, three
size vectors), the CompVis keys building the same list, drops and nulls, and routing into the UNet."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from _helpers import perturb
from ldm.modules.encoders.conditioner import EmbedderRole, Feed, GeneralConditioner, Null
from ldm.modules.model_inputs import ConditionInput
from ldm.util import ConfigError, instantiate_from_config

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
T, D1, D2, OUT = 8, 8, 12, 4  # tokens, the two text widths, each size value's embedding width
VECTOR = D2 + len(SIZE_KEYS) * 2 * OUT


def _emb_models(text_ucg: float = 0.0, legacy: object = None, trainable_first: bool = False) -> list:
    first = {"is_trainable": trainable_first, "input_key": "txt", "ucg_rate": text_ucg,
             "target": "ldm.modules.encoders.modules.BERTEmbedder",
             "params": {"n_embed": D1, "n_layer": 1, "max_seq_len": T, "n_heads": 2}}
    if legacy is not None:
        first["legacy_ucg_value"] = legacy
    second = {"is_trainable": False, "input_key": "txt", "ucg_rate": text_ucg,
              "target": "_helpers.PooledTextStandIn", "params": {"n_embed": D2, "max_seq_len": T}}
    sizes = [{"is_trainable": False, "input_key": k, "target": "ldm.modules.encoders.modules.ConcatTimestepEmbedderND",
              "params": {"outdim": OUT}} for k in SIZE_KEYS]
    return [first, second, *sizes]


def _sdxl_shaped(**emb) -> torch.nn.Module:
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                       "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
                       "use_spatial_transformer": True, "context_dim": D1 + D2, "num_classes": "sequential",
                       "adm_in_channels": VECTOR, "use_linear_in_transformer": True}}
    cfg = OmegaConf.create({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "first_stage_config": {"target": "ldm.models.autoencoder.IdentityFirstStage"},
        "conditioner_config": {"target": "ldm.modules.encoders.conditioner.GeneralConditioner",
                               "params": {"emb_models": _emb_models(**emb)}},
        "unet_config": unet, "image_size": 8, "channels": 4, "timesteps": 100, "use_ema": False,
        "first_stage_key": "jpg"}}})
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model, key="model")
    perturb(model.model, seed=1)
    return model


def _batch(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"jpg": torch.rand(n, 8, 8, 4, generator=g) * 2 - 1, "txt": ["a red cube", "two blue spheres"][:n],
            "original_size_as_tuple": torch.tensor([[1024, 768], [512, 512]][:n]),
            "crop_coords_top_left": torch.tensor([[0, 0], [16, 32]][:n]),
            "target_size_as_tuple": torch.tensor([[1024, 1024], [768, 512]][:n])}


def _sinusoid(v: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(v f_i), sin(v f_i)], f_i = 10000^(-i / half), written out here as the reference."""
    half = dim // 2
    f = torch.tensor([math.exp(-math.log(10000) * i / half) for i in range(half)])
    a = v.double()[:, None] * f.double()[None]
    return torch.cat([a.cos(), a.sin()], 1).float()


def test_an_sdxl_shaped_conditioner_list_builds_and_routes_its_outputs():
    model = _sdxl_shaped()
    cond = model.conditioner
    assert [type(e.module).__name__ for e in cond.entries] == ["BERTEmbedder", "PooledTextStandIn",
                                                              *["ConcatTimestepEmbedderND"] * 3]
    assert [e.role.reads for e in cond.entries[:2]] == [ConditionInput.PROMPTS] * 2
    assert [e.role.guided for e in cond.entries] == [True, True, False, False, False]
    batch = _batch()
    with torch.no_grad():
        c = model.get_learned_conditioning(batch)
        t1 = cond.entries[0].module(batch["txt"])
        t2, pooled = cond.entries[1].module(batch["txt"])
    # the two text encoders' states concatenated on the feature axis: the cross-attention context
    assert set(c) == {"c_crossattn", "c_adm"}
    torch.testing.assert_close(c["c_crossattn"][0], torch.cat([t1, t2], 2), rtol=0, atol=0)
    # the pooled text, then each size pair embedded value by value: the vector input
    sizes = [torch.cat([_sinusoid(batch[k][:, j], OUT) for j in range(2)], 1) for k in SIZE_KEYS]
    assert c["c_adm"].shape == (2, VECTOR)
    torch.testing.assert_close(c["c_adm"], torch.cat([pooled, *sizes], 1), rtol=1e-5, atol=1e-5)

    # both reach the UNet: its context and its y are what the conditioner made
    seen = {}
    unet = model.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    model.train()
    loss, _ = model.shared_step(batch)
    handle.remove()
    torch.testing.assert_close(seen["context"], c["c_crossattn"][0])
    torch.testing.assert_close(seen["y"], c["c_adm"])
    loss.backward()
    assert unet.label_emb[0][0].weight.grad.abs().sum() > 0  # the vector path trains the UNet's label embedding
    assert all(not p.requires_grad for p in cond.parameters())  # frozen embedders: no gradients
    assert model.state_dict().keys() >= {"conditioner.embedders.0.transformer.token_emb.weight",
                                         "conditioner.embedders.1.pool.weight"}  # sgm's checkpoint layout


def test_sampling_an_embedder_list_nulls_the_guided_embedders_only():
    model = _sdxl_shaped().eval()
    batch = _batch()
    raw = {k: batch[k] for k in SIZE_KEYS}
    cc = model.conditioning(prompts=batch["txt"], raw=raw)
    cond, uncond = cc.cond, cc.uncond
    # text (guided, nulled by zeros as sgm's force_uc_zero_embeddings): zero context, zero pooled part
    assert torch.equal(uncond["c_crossattn"][0], torch.zeros_like(cond["c_crossattn"][0]))
    assert torch.equal(uncond["c_adm"][:, :D2], torch.zeros(2, D2))
    # sizes (not guided): shared
    assert torch.equal(uncond["c_adm"][:, D2:], cond["c_adm"][:, D2:])
    assert not torch.equal(cond["c_crossattn"][0], uncond["c_crossattn"][0])
    from ldm.generation import generate

    x = generate(model, cc, 2, steps=3, scale=4.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(Exception, match="target_size_as_tuple"):
        model.conditioning(prompts=batch["txt"], raw={k: raw[k] for k in SIZE_KEYS[:2]})


def test_embedders_drop_at_their_own_rate_to_zeros_or_to_their_legacy_value():
    batch = _batch()
    zeros = _sdxl_shaped(text_ucg=1.0)
    c = zeros.conditioner(batch, drop=True)
    assert torch.equal(c["c_crossattn"][0], torch.zeros_like(c["c_crossattn"][0]))
    assert torch.equal(c["c_adm"][:, :D2], torch.zeros(2, D2)) and c["c_adm"][:, D2:].abs().sum() > 0
    kept = zeros.conditioner(batch, drop=False)  # no drop outside training
    assert kept["c_crossattn"][0].abs().sum() > 0

    legacy = _sdxl_shaped(text_ucg=1.0, legacy="")
    c = legacy.conditioner(batch, drop=True)
    with torch.no_grad():
        empty = legacy.conditioner.entries[0].module(["", ""])
    torch.testing.assert_close(c["c_crossattn"][0][..., :D1], empty, rtol=0, atol=0)  # the empty prompt's states
    assert torch.equal(c["c_crossattn"][0][..., D1:], torch.zeros(2, T, D2))          # the other: zeros


def test_a_trainable_embedder_gets_gradients_and_joins_the_optimizer():
    model = _sdxl_shaped(trainable_first=True)
    model.train()
    first = model.conditioner.entries[0].module
    ids = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in ids for p in first.parameters())
    assert not any(id(p) in ids for p in model.conditioner.entries[1].module.parameters())
    loss, _ = model.shared_step(_batch())
    loss.backward()
    assert first.transformer.token_emb.weight.grad is not None
    assert first.transformer.token_emb.weight.grad.abs().sum() > 0


def test_an_emb_models_entry_with_a_typo_is_refused_with_the_closest_key():
    entries = _emb_models()
    entries[2] = {**entries[2], "input_kye": entries[2]["input_key"]}
    del entries[2]["input_key"]
    with pytest.raises(ConfigError) as e:
        GeneralConditioner(OmegaConf.create(entries))
    assert "emb_models[2]" in str(e.value) and "did you mean 'input_key'" in str(e.value)
    with pytest.raises(ConfigError, match="feeds"):
        GeneralConditioner([{**_emb_models()[2], "feeds": "vectr"}])
    with pytest.raises(ValueError, match="ucg_rate"):
        EmbedderRole(input_keys=("txt",), ucg_rate=1.5)


def test_the_compvis_keys_build_the_same_list_and_keep_their_checkpoint_names():
    from _helpers import tiny_sd2

    model = instantiate_from_config(tiny_sd2("v2-inference").model)
    (entry,) = model.conditioner.entries
    assert entry.module is model.cond_stage_model
    assert entry.role == EmbedderRole(input_keys=("txt",), null=Null.NULL_INPUT, feeds=(Feed.CROSSATTN,),
                                      reads=ConditionInput.PROMPTS, guided=True)
    assert not any(k.startswith("conditioner.") for k in model.state_dict())  # borrowed: CompVis names kept
    assert model.condition_inputs == frozenset({ConditionInput.PROMPTS})
    # a deep copy (the distillation teacher's) keeps the borrowed module its own
    twin = copy.deepcopy(model)
    assert twin.conditioner.entries[0].module is twin.cond_stage_model


def test_conditioner_and_cond_stage_config_together_are_refused():
    cfg = OmegaConf.create({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "first_stage_config": {"target": "ldm.models.autoencoder.IdentityFirstStage"},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.IdentityEncoder"},
        "conditioner_config": {"target": "ldm.modules.encoders.conditioner.GeneralConditioner"},
        "unet_config": {}}})
    with pytest.raises(ConfigError, match="not both"):
        instantiate_from_config(cfg)
