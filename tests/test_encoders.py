"""Conditioners: tokenizers read offline, different prompts give different states, caching, class embedder, CLIP."""
from __future__ import annotations

import pytest
import torch

from ldm.modules.encoders.modules import (BERTEmbedder, BERTTokenizer, ClassEmbedder, CLIPTokenizerOffline,
                                          FrozenCLIPEmbedder, FrozenMiniLMEmbedder, FrozenOpenCLIPEmbedder,
                                          PretrainedWeightsMissing)


@pytest.mark.minilm
def test_bert_tokenizer_knows_the_shapes_words():
    tok = BERTTokenizer(vq_interface=False, max_length=16)
    ids = tok(["a large red square in the top left", "a small blue circle in the center"])
    assert ids.shape == (2, 16) and not torch.equal(ids[0], ids[1])
    assert (ids == tok.tokenizer.unk_token_id).sum() == 0


@pytest.mark.minilm
def test_minilm_states_differ_per_prompt_and_cache():
    enc = FrozenMiniLMEmbedder(max_length=16)
    a = enc(["a large red square in the top left", "a small blue circle in the bottom right", ""])
    assert a.shape == (3, 16, 384)
    assert (a[0] - a[1]).abs().mean() > 0.05 and (a[0] - a[2]).abs().mean() > 0.05
    assert len(enc._cache) == 3
    b = enc(["a small blue circle in the bottom right"])
    assert torch.equal(b[0], a[1])
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.minilm
def test_bert_embedder_trains_from_scratch():
    emb = BERTEmbedder(n_embed=32, n_layer=2, max_seq_len=16)
    out = emb(["a red circle", "a blue square"])
    assert out.shape == (2, 16, 32) and out.requires_grad


def test_class_embedder_null_class():
    ce = ClassEmbedder(8, n_classes=18, add_null_class=True, key="class_label")
    assert ce.null_label == 18
    assert ce({"class_label": torch.tensor([0, 18])}).shape == (2, 1, 8)
    with pytest.raises(ValueError, match="out of range"):
        ce(torch.tensor([19]))


def test_clip_tokenizer_sd_conventions():
    tok = CLIPTokenizerOffline()
    ids = tok(["a photo of a cat"])
    assert ids.shape == (1, 77) and int(ids[0, 0]) == tok.sot
    n = int((ids[0] != tok.eot).sum())
    assert int(ids[0, n]) == tok.eot and int(ids[0, -1]) == tok.eot  # padded with <|endoftext|>


def test_frozen_clip_from_local_dir_and_missing_weights(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77)
    CLIPTextModel(cfg).save_pretrained(tmp_path / "clip")
    enc = FrozenCLIPEmbedder(version=str(tmp_path / "clip"))
    out = enc(["a photo of a cat", "a dog"])
    assert out.shape == (2, 77, 32) and not torch.equal(out[0], out[1])
    assert any(k.startswith("transformer.text_model.") for k in enc.state_dict())
    with pytest.raises(PretrainedWeightsMissing, match="version"):
        FrozenCLIPEmbedder(version="openai/clip-vit-large-patch14-not-here")
    with pytest.raises(PretrainedWeightsMissing, match="laion2b_s32b_b79k"):
        FrozenOpenCLIPEmbedder(version="laion2b_s32b_b79k")


@pytest.mark.parametrize("batch_first", [True, False])
def test_openclip_text_states_are_the_same_for_both_block_layouts(batch_first):
    """open_clip < 2.26 runs its blocks sequence-first; old code fed them batch-first states (wrong attention)."""
    from types import SimpleNamespace

    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    width, ctx = 16, 77

    def model(bf):
        torch.manual_seed(1)
        blocks = torch.nn.ModuleList([ResidualAttentionBlock(width, 2, batch_first=bf) for _ in range(2)])
        transformer = SimpleNamespace(resblocks=blocks) if not bf else SimpleNamespace(resblocks=blocks, batch_first=True)
        torch.manual_seed(2)
        return SimpleNamespace(token_embedding=torch.nn.Embedding(49408, width),
                               positional_embedding=torch.randn(ctx, width) * 0.1, transformer=transformer,
                               attn_mask=torch.full((ctx, ctx), float("-inf")).triu(1),
                               ln_final=torch.nn.LayerNorm(width))

    def states(m):
        enc = SimpleNamespace(model=m, tokenizer=CLIPTokenizerOffline(ctx), layer_idx=1)
        with torch.no_grad():
            return FrozenOpenCLIPEmbedder._encode_batch(enc, ["a red circle", "two blue squares on the left"])

    reference = states(model(True))  # the current open_clip layout
    out = states(model(batch_first))
    assert out.shape == (2, ctx, width) and torch.allclose(out, reference, atol=1e-5)
