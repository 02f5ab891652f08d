"""CompVis `ldm.data.openimages` SR names (never published by CompVis): super-resolution pairs over a local copy of
Open Images, one folder of images per split (`root`, default data/openimages/{train,validation}); see
ldm.data.superres for the parameters."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from ldm.data.superres import SuperresFolder

DEFAULT_ROOT = Path("data/openimages")


class SuperresOpenImagesAdvancedTrain(SuperresFolder):
    """Training split: random crops of `root` (default data/openimages/train)."""

    def __init__(self, size: int, root: Optional[Union[str, Path]] = None, **kwargs: Any):
        super().__init__(root if root is not None else DEFAULT_ROOT / "train", size=size, **kwargs)


class SuperresOpenImagesAdvancedValidation(SuperresFolder):
    """Validation split: `root` (default data/openimages/validation)."""

    def __init__(self, size: int, root: Optional[Union[str, Path]] = None, **kwargs: Any):
        super().__init__(root if root is not None else DEFAULT_ROOT / "validation", size=size, **kwargs)
