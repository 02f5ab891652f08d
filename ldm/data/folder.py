"""Users' own images: ImageFolder (optional class subfolders) and ImageCaptionFolder (.txt / JSONL / CSV captions)."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from ldm.data.transforms import Crop, resize_crop
from ldm.files import read_rgb8

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_SKIPS = 50  # consecutive unreadable files tolerated before giving up on an item


def check_root(root: Union[str, Path], what: str) -> Path:
    if root is None or str(root) in ("", "???"):
        raise ValueError(f"{what}: `root` is not set; point it at a directory of images")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: image directory not found: {path}")
    return path


class _FileImages(Dataset):
    """Reads files[i] with resize/crop/flip; an unreadable file is logged with its path and skipped."""

    def __init__(self, files: Sequence[Path], size: Optional[int], crop: Crop, flip: bool, seed: Optional[int]):
        self.files = list(files)
        self.size, self.crop, self.flip, self.seed = size, crop, flip, seed
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng(None if self.seed is None else [self.seed, i])

    def _load(self, i: int) -> np.ndarray:
        return resize_crop(read_rgb8(self.files[i]), self.size, self.crop, self.flip, self._rng(i))

    def _item(self, i: int) -> dict:
        raise NotImplementedError

    def _read(self, j: int) -> dict:
        item = self._item(j)
        item["image"] = self._load(j)
        item["file_path_"] = str(self.files[j])
        return item

    def __getitem__(self, i: int) -> dict:
        return first_readable(self.files, self.bad, i, self._read)


def first_readable(files: Sequence[Path], bad: set, i: int, read: Callable[[int], Any]) -> Any:
    """read(j) for the first j = i, i + 1, ... (wrapping) whose file reads; unreadable files are logged, remembered in
    `bad` and skipped, up to MAX_SKIPS in a row."""
    n = len(files)
    for k in range(min(MAX_SKIPS, n)):
        j = (i + k) % n
        if j in bad:
            continue
        try:
            return read(j)
        except Exception as e:  # corrupt/truncated/unsupported file: log and move on
            bad.add(j)
            logger.warning("skipping unreadable image %s: %s: %s", files[j], type(e).__name__, e)
    raise RuntimeError(f"{MAX_SKIPS} consecutive unreadable images around index {i} "
                       f"(first: {files[i % n]}); check the data directory")


def scan_images(root: Path, extensions: Sequence[str]) -> list[Path]:
    exts = tuple(e.lower() for e in extensions)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


class ImageFolder(_FileImages):
    """All images under `root` (recursive); with `class_subfolders`, the top-level folder is the class label."""

    def __init__(self, root: Union[str, Path], size: Optional[int] = 256, crop: Crop = "center", flip: bool = False,
                 class_subfolders: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 seed: Optional[int] = None):
        root = check_root(root, "ImageFolder")
        files = scan_images(root, extensions)
        if not files:
            raise FileNotFoundError(f"ImageFolder: no images with extensions {list(extensions)} under {root}")
        super().__init__(files, size, crop, flip, seed)
        self.root = root
        self.class_subfolders = class_subfolders
        if class_subfolders:
            self.classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
            if not self.classes:
                raise ValueError(f"ImageFolder: class_subfolders is set but {root} has no subfolders with images")
            self.files = [f for f in files if len(f.relative_to(root).parts) > 1]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def _item(self, i: int) -> dict:
        if not self.class_subfolders:
            return {}
        cls = self.files[i].relative_to(self.root).parts[0]
        return {"class_label": self.class_to_idx[cls], "human_label": cls}


class ImageCaptionFolder(_FileImages):
    """Images with captions: same-stem `.txt` files, or a JSONL/CSV manifest (`file`/`image`, `caption`/`text`)."""

    def __init__(self, root: Union[str, Path], size: Optional[int] = 256, crop: Crop = "center", flip: bool = False,
                 manifest: Optional[Union[str, Path]] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 seed: Optional[int] = None):
        root = check_root(root, "ImageCaptionFolder")
        rows = self._from_manifest(root, Path(manifest)) if manifest else self._from_txt(root, extensions)
        if not rows:
            raise FileNotFoundError(f"ImageCaptionFolder: no captioned images under {root}"
                                    + (f" listed in {manifest}" if manifest else " (expected NAME.txt beside NAME.png)"))
        super().__init__([p for p, _, _ in rows], size, crop, flip, seed)
        self.root = root
        self.captions = [c for _, c, _ in rows]
        self.metadata = [m for _, _, m in rows]  # a manifest row's other fields (none for .txt captions)

    @staticmethod
    def _from_txt(root: Path, extensions: Sequence[str]) -> list[tuple[Path, str, dict]]:
        pairs, missing = [], 0
        for f in scan_images(root, extensions):
            txt = f.with_suffix(".txt")
            if txt.is_file():
                pairs.append((f, txt.read_text(encoding="utf-8", errors="replace").strip(), {}))
            else:
                missing += 1
        if missing:
            logger.warning("ImageCaptionFolder: %d images under %s have no .txt caption and are skipped", missing, root)
        return pairs

    @staticmethod
    def _from_manifest(root: Path, manifest: Path) -> list[tuple[Path, str, dict]]:
        if not manifest.is_absolute() and not manifest.is_file():
            manifest = root / manifest
        if not manifest.is_file():
            raise FileNotFoundError(f"ImageCaptionFolder: manifest not found: {manifest}")
        rows: list[dict] = []
        if manifest.suffix.lower() in (".jsonl", ".json"):
            for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{manifest}:{n}: not valid JSON: {e}") from e
        elif manifest.suffix.lower() in (".csv", ".tsv"):
            with open(manifest, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if manifest.suffix.lower() == ".tsv" else ","))
        else:
            raise ValueError(f"{manifest}: manifest must be .jsonl or .csv/.tsv")
        pairs = []
        for n, row in enumerate(rows, 1):
            name = row.get("file") or row.get("image") or row.get("file_name")
            cap = row.get("caption") if row.get("caption") is not None else row.get("text")
            if not name or cap is None:
                raise ValueError(f"{manifest}: row {n} needs a `file` (or `image`) and a `caption` (or `text`) field")
            extra = {k: v for k, v in row.items() if k not in ("file", "image", "file_name", "caption", "text")}
            pairs.append((root / name, str(cap), extra))
        return pairs

    def _item(self, i: int) -> dict:
        return {"caption": self.captions[i]}
