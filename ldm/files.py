"""Files in and out: the one image reader of the project (bit depths, gray, palette, alpha, EXIF orientation), PNGs
with their settings as text chunks, and outputs that never replace an input or an earlier result unless asked,
written atomically."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from ldm.errors import InputError, OutputConflict

PathLike = Union[str, Path]
# Pillow's modes of 16-bit gray images; their values span 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535.0


class ImageReadError(InputError):
    """An image file that cannot be read (missing, truncated, corrupt, or of an unsupported kind); names the file."""


def open_image(path: PathLike) -> Image.Image:
    """The decoded image of `path`, turned upright by its EXIF orientation; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, with its name
            return ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: not a readable image (truncated or corrupt?): {e}") from e


def _as_float(im: Image.Image, path: PathLike) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: 16-bit gray at full precision; 1-bit, 8-bit, gray, palette and CMYK via RGB;
    an alpha channel is dropped (the stored colour is kept)."""
    if im.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > SIXTEEN_BIT_MAX):
            raise ImageReadError(f"{path}: {im.mode} image with values outside 0..65535 (32-bit integers are not "
                                 f"supported; save it as an 8- or 16-bit PNG)")
        gray = (arr / SIXTEEN_BIT_MAX).astype(np.float32)
        return np.repeat(gray[..., None], 3, axis=-1)
    if im.mode == "F":
        raise ImageReadError(f"{path}: 32-bit floating-point image (mode F) is not supported; save it as an 8- or "
                             f"16-bit PNG")
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def read_image(path: PathLike) -> np.ndarray:
    """An image file as (H, W, 3) float32 in [0, 1], read the same way everywhere (see `_as_float`)."""
    return _as_float(open_image(path), path)


def read_rgb8(path: PathLike) -> Image.Image:
    """An image file as an 8-bit RGB PIL image (16-bit gray rounded to 8 bits, not clipped), for the datasets."""
    im = open_image(path)
    if im.mode == "RGB":
        return im
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "F":
        return Image.fromarray(np.round(_as_float(im, path) * 255.0).astype(np.uint8))
    return im.convert("RGB")


def _inode(path: Path):
    """(device, inode) of an existing file, which hard links share; None otherwise."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_outputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike] = (), *, overwrite: bool = False,
                  flag: str = "output") -> None:
    """Refuse, before any work, outputs that are (or resolve to, or hard-link) an input, two outputs of one path,
    and, unless `overwrite`, outputs that exist already; the message names `flag` and the files."""
    outputs, inputs = [Path(p) for p in outputs], [Path(p) for p in inputs]
    for folder in dict.fromkeys(out.parent for out in outputs):
        check_output_folder(folder, flag)
    by_path = {i.resolve(): i for i in inputs}  # each path resolved once: folders of thousands of images stay fast
    by_inode = {ino: i for i in inputs if (ino := _inode(i)) is not None}
    seen: dict[Path, Path] = {}
    for out in outputs:
        key = out.resolve()
        hit = by_path.get(key) or by_inode.get(_inode(out))
        if hit is not None:
            raise OutputConflict(f"{flag}: the output {out} is the input {hit}; it would be overwritten. "
                                 f"Choose another {flag}")
        if key in seen:
            raise OutputConflict(f"{flag}: two results would be written to {out}; rename one of their inputs")
        seen[key] = out
    existing = [p for p in outputs if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:5]) + (f" (+{len(existing) - 5} more)" if len(existing) > 5 else "")
        raise OutputConflict(f"{flag}: {len(existing)} output(s) exist already: {shown}. Pass --overwrite to replace "
                             f"them, or choose another {flag}")


def check_output_folder(folder: PathLike, flag: str = "output") -> None:
    """Refuse an output folder that (or a folder above which) exists as a file."""
    for f in (Path(folder), *Path(folder).parents):
        if f.exists():
            if not f.is_dir():
                raise OutputConflict(f"{flag}: {f} exists and is not a folder; nothing can be written under it")
            return


def check_output_dir(folder: PathLike, inputs: Iterable[PathLike] = (), *, overwrite: bool = False,
                     flag: str = "output") -> None:
    """Refuse a non-empty existing output folder unless `overwrite`, and one that is an input or holds one."""
    folder = Path(folder)
    target = folder.resolve()
    for i in (Path(p) for p in inputs):
        if target == i.resolve() or target in i.resolve().parents:
            raise OutputConflict(f"{flag}: the output folder {folder} is or holds the input {i}; choose another {flag}")
    check_output_folder(folder, flag)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputConflict(f"{flag}: the folder {folder} exists and is not empty. Pass --overwrite to write into "
                             f"it, or choose another {flag}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary name next to `path` (same suffix) to write to; renamed to `path` when the block succeeds, removed
    when it fails, so an interrupted write never leaves a half file under the real name."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- images as tensors, PNGs with metadata ----------------------------------------------------------------
def load_image(path: Union[str, Path]) -> torch.Tensor:
    """An image file as (1, 3, H, W) in [-1, 1], read by `ldm.files.read_image` (16-bit, gray, palette, EXIF)."""
    return torch.from_numpy(read_image(path) * 2.0 - 1.0).permute(2, 0, 1)[None]


def file_hash(path: Union[str, Path], n: int = 10) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return x


def save_png(array: np.ndarray, path: Union[str, Path], meta: dict) -> None:
    """Write a uint8 (H, W, C) array as a PNG with `meta` as text chunks, atomically (no half file on interruption)."""
    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(str(k), str(v))
    with atomic_path(path) as tmp:
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(tmp, format="PNG", pnginfo=info)
