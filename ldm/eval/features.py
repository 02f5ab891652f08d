"""Feature extractors for distribution metrics: the TF-ported Inception-v3 (FID, KID, IS, precision/recall) and
the domain classifier (domain FID), behind one interface: uint8 (B, 3, H, W) in, named feature tensors out.
"""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional, Protocol, Union

import torch

from ldm.eval.domain import load_domain_classifier
from ldm.eval.images import resize_bicubic
from ldm.files import file_hash
from ldm.pretrained import resolve_torch_hub_file

# The FID Inception: TensorFlow's 2015-12-05 graph (pool3 features, 1008 logits) ported to PyTorch by torch-fidelity.
# torchvision's ImageNet Inception-v3 is a different network and gives FIDs about 1.5 lower: never a substitute.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SIZE = 299


class Resize(str, enum.Enum):
    """How images reach the Inception's 299x299 input."""
    PIL_BICUBIC = "pil_bicubic"  # clean-fid: antialiased PIL bicubic (default)
    TF_BILINEAR = "tf_bilinear"  # legacy TF-FID / torch-fidelity default: TF1's aliasing bilinear resize


class FeatureExtractor(Protocol):
    name: str
    settings: dict

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def resolve_inception_weights(explicit: Optional[Union[str, Path]] = None) -> Path:
    """The TF-FID Inception weights: explicit file, the torch hub cache, then torch.hub's download when online."""
    return resolve_torch_hub_file(
        INCEPTION_URL, what="Inception-v3 FID weights (TensorFlow 2015-12-05 graph, torch-fidelity's port)",
        config_key="--inception_weights", explicit=explicit, check_hash=False,
        hint="download it on a machine with internet and copy it there, or pass its path")


class InceptionFeatures:
    """FID Inception-v3 (torch-fidelity's FeatureExtractorInceptionV3): 2048-d pool features and 1008 logits."""

    def __init__(self, weights: Optional[Union[str, Path]] = None, resize: Union[Resize, str] = Resize.PIL_BICUBIC,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 50):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from ldm.checkpoint import load_checkpoint
        path = resolve_inception_weights(weights)
        # torch-fidelity unpickles the file without weights_only; read it safely first, so a file holding code
        # is refused here (a file that loads with weights_only=True holds only tensors and containers)
        load_checkpoint(path)
        self.resize = Resize(resize)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path)).to(device)
        self.device, self.batch_size = torch.device(device), batch_size
        self.name = "inception"
        self.settings = {"extractor": "inception-v3-tf-2015-12-05", "weights": path.name,
                         "weights_sha256": file_hash(path), "resize": self.resize.value, "input": "uint8 RGB"}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size]
            if self.resize is Resize.PIL_BICUBIC:
                x = resize_bicubic(x, INCEPTION_SIZE)  # the extractor's own resize is then the identity
            f, lg = self.net(x.to(self.device))
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        return {"features": torch.cat(feats), "logits": torch.cat(logits)}


class DomainFeatures:
    """The domain classifier's features (domain FID) and its per-head predictions (adherence)."""

    def __init__(self, path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
        trained = load_domain_classifier(path, device)
        self.classifier, self.info = trained.classifier, trained.info
        self.name = "domain"
        self.settings = {"extractor": "domain-classifier", "weights": Path(path).name,
                         "weights_sha256": file_hash(path), "resize": f"pil_bicubic to {self.classifier.image_size}",
                         "input": "uint8 RGB", "validation_accuracy": self.info.get("validation_accuracy")}

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.classifier.embed(images)
        out["features"] = out["features"].double()
        return out
