"""DreamBooth data (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation"): a few instance images with the identifier prompt ("a photo of sks dog"), each item paired with a
class image the base model made for the class prompt ("a photo of a dog"), for the prior-preservation loss.

Items carry `image` / `caption` (the instance) and, with a class folder, `prior_image` / `prior_caption`
(ldm.modules.model_inputs.PRIOR_PREFIX); the model trains on both halves of a batch, the class half weighted
by its `prior_loss_weight`. Class images are made (and cached) by `scripts/dreambooth.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from torch.utils.data import Dataset

from ldm.data.folder import IMAGE_EXTENSIONS, ImageFolder, scan_images
from ldm.errors import InputError
from ldm.modules.model_inputs import PRIOR_PREFIX


class DreamBoothDataset(Dataset):
    """Instance images (`instance_dir`) with `instance_prompt`; with `class_dir`, each item also carries a class
    image (cycled) and `class_prompt`. Length: the larger of the two folders (as diffusers' DreamBooth script)."""

    def __init__(self, instance_dir: Union[str, Path], instance_prompt: str, class_dir: Optional[Union[str, Path]] = None,
                 class_prompt: Optional[str] = None, size: int = 256, flip: bool = False,
                 min_class_images: int = 1, image_key: str = "image", caption_key: str = "caption",
                 seed: Optional[int] = None):
        if not instance_prompt:
            raise InputError("DreamBoothDataset: instance_prompt is empty; give the identifier prompt "
                             "(e.g. 'a photo of sks dog')")
        self.instance = ImageFolder(instance_dir, size=size, flip=flip, seed=seed)
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.image_key, self.caption_key = image_key, caption_key
        self.prior = None
        if class_dir is not None:
            if not class_prompt:
                raise InputError("DreamBoothDataset: class_dir is given without class_prompt")
            folder = Path(class_dir)
            found = scan_images(folder, IMAGE_EXTENSIONS) if folder.is_dir() else []
            if len(found) < min_class_images:
                raise InputError(f"DreamBoothDataset: {folder} has {len(found)} class images, {min_class_images} "
                                 f"wanted; make them with scripts/dreambooth.py (it generates the missing ones "
                                 f"with the base model)")
            self.prior = ImageFolder(folder, size=size, flip=flip, seed=seed)

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior) if self.prior is not None else 0)

    def __getitem__(self, i: int) -> dict:
        item = {self.image_key: self.instance[i % len(self.instance)]["image"], self.caption_key: self.instance_prompt}
        if self.prior is not None:
            item[PRIOR_PREFIX + self.image_key] = self.prior[i % len(self.prior)]["image"]
            item[PRIOR_PREFIX + self.caption_key] = self.class_prompt
        return item
