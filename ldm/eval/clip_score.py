"""CLIP score (Hessel et al. 2021): 100 x max(cos(image embedding, text embedding), 0), torchmetrics' CLIPScore.

The CLIP model is a transformers folder found like every pretrained part (explicit folder, the Hugging Face hub
cache, then a download when online). Images reach the CLIP processor as uint8: its rescaling by 1/255 is
applied whatever the dtype, so float images in [0, 1] would silently score as near-black images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ldm.errors import InputError
from ldm.eval.images import to_uint8_rgb
from ldm.pretrained import resolve_hf_model

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_FILES = ("config.json", "vocab.json", "merges.txt")
# the image processor's settings: preprocessor_config.json on the hub, processor_config.json from transformers 5
CLIP_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json",
                        "special_tokens_map.json", "tokenizer.json")


def resolve_clip_model(version: str = DEFAULT_CLIP, explicit: Optional[Union[str, Path]] = None) -> Path:
    """A CLIP (image + text) transformers folder for the CLIP score."""
    if explicit is None and Path(version).is_dir():
        explicit = version
    return resolve_hf_model(version, what=f"CLIP model for the CLIP score ({version})", config_key="--clip_model",
                            explicit=explicit, required=CLIP_FILES, optional=CLIP_PROCESSOR_FILES)


class _ProjectedFeatures(torch.nn.Module):
    """CLIPModel whose get_*_features return the projected embeddings as tensors.

    transformers 5 returns a model output holding them in `pooler_output`; torchmetrics expects the tensor.
    """

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip, self.config = clip, clip.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


class CLIPScorer:
    """Mean CLIP score of (image, caption) pairs, batched; torchmetrics computes it."""

    def __init__(self, version: str = DEFAULT_CLIP, explicit: Optional[Union[str, Path]] = None,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 64):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor
        folder = resolve_clip_model(version, explicit)
        self.metric = CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(CLIPModel.from_pretrained(str(folder))),
                                                            CLIPProcessor.from_pretrained(str(folder)))).to(device)
        self.batch_size = batch_size
        self.settings = {"clip_model": version, "folder": str(folder), "input": "uint8 RGB"}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} images but {len(prompts)} prompts")
        self.metric.reset()
        for i in range(0, len(images), self.batch_size):
            x = to_uint8_rgb(images[i:i + self.batch_size])
            self.metric.update(list(x), list(prompts[i:i + self.batch_size]))
        return float(self.metric.compute())
