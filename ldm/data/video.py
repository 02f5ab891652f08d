"""Video clips for the video LDM: from video files (read by PyAV, ldm.data.video_io) and from folders of frames, with a
frame stride or a target fps, one resize / crop for every frame of a clip, and captions beside the file or in a
manifest. An unreadable or too-short video is skipped, named and counted when the dataset is built."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.folder import IMAGE_EXTENSIONS, ImageCaptionFolder, check_root
from ldm.data.transforms import Crop, resize_crop
from ldm.data.video_io import VIDEO_EXTENSIONS, probe_video, read_video

logger = logging.getLogger(__name__)

# frame-folder extensions (a folder of numbered frames is one clip); GIF is read as a video file
FRAME_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e != ".gif")
START_CHOICES = ("random", "first", "center")


@dataclass(frozen=True)
class ClipSource:
    """One video file or frame folder, its frame count and rate, and its caption."""
    path: Path
    frames: int
    fps: float
    caption: Optional[str]
    is_folder: bool


class VideoClips(Dataset):
    """One clip per video under `root`: `frames` frames `frame_stride` apart (or at `fps`, the stride rounded from
    the source's rate), resized on the short side to `size` and cropped, the same for every frame.

    Items: {"video": float32 (T, size, size, 3) in [-1, 1], "caption": str, "fps": the clip's rate,
    "file_path_": str}. Captions: `NAME.txt` beside `NAME.mp4` (or beside / inside a frame folder as
    `caption.txt`), or a JSONL / CSV `manifest` (`file`, `caption` columns); `captions=False` reads none.
    `start`: where a clip begins in its video ('random' for training, 'first', 'center').
    """

    def __init__(self, root: Union[str, Path], frames: int = 8, frame_stride: int = 1, fps: Optional[float] = None,
                 size: Optional[int] = 64, crop: Crop = "center", flip: bool = False, start: str = "random",
                 manifest: Optional[Union[str, Path]] = None, captions: bool = True, folder_fps: float = 8.0,
                 seed: Optional[int] = None):
        if frames < 1 or frame_stride < 1:
            raise ValueError(f"VideoClips: frames ({frames}) and frame_stride ({frame_stride}) must be >= 1")
        if start not in START_CHOICES:
            raise ValueError(f"VideoClips: start '{start}' must be one of {list(START_CHOICES)}")
        if fps is not None and fps <= 0:
            raise ValueError(f"VideoClips: fps {fps} must be > 0")
        self.root = check_root(root, "VideoClips")
        self.frames, self.frame_stride, self.fps = int(frames), int(frame_stride), fps
        self.size, self.crop, self.flip, self.start, self.seed = size, crop, flip, start, seed
        self.folder_fps = float(folder_fps)
        self.skipped: dict[str, list[str]] = {"unreadable": [], "too short": [], "no caption": []}
        captions_of = self._manifest_captions(manifest) if manifest else None
        self.sources = [s for s in (self._probe(p, captions, captions_of) for p in self._candidates(captions_of))
                        if s is not None]
        for why, paths in self.skipped.items():
            if paths:
                logger.warning("VideoClips: skipped %d %s video%s under %s: %s", len(paths), why,
                               "s" if len(paths) > 1 else "", self.root, ", ".join(paths[:5])
                               + (f", ... (+{len(paths) - 5})" if len(paths) > 5 else ""))
        if not self.sources:
            raise FileNotFoundError(f"VideoClips: no usable clips of {frames} frames under {self.root} "
                                    f"(skipped: {self.skipped_counts})")

    @property
    def skipped_counts(self) -> dict[str, int]:
        return {why: len(paths) for why, paths in self.skipped.items()}

    # -- the index -----------------------------------------------------------------------------------
    def _manifest_captions(self, manifest: Union[str, Path]) -> dict[Path, str]:
        rows = ImageCaptionFolder._from_manifest(self.root, Path(manifest))  # same columns as the image folders
        return {path.resolve(): caption for path, caption, _ in rows}

    def _candidates(self, captions_of: Optional[dict[Path, str]]) -> list[Path]:
        if captions_of is not None:
            return sorted(captions_of)
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        folders = sorted({p.parent for p in self.root.rglob("*")
                          if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS})
        return files + folders

    def _stride(self, source_fps: float) -> int:
        if self.fps is None or source_fps <= 0:
            return self.frame_stride
        return max(1, round(source_fps / self.fps))

    def _probe(self, path: Path, captions: bool, captions_of: Optional[dict[Path, str]]) -> Optional[ClipSource]:
        name = str(path.relative_to(self.root) if path.is_relative_to(self.root) else path)
        is_folder = path.is_dir()
        try:
            if is_folder:
                n, rate = len(_frame_files(path)), self.folder_fps
            else:
                info = probe_video(path)
                n, rate = info.frames, info.fps
        except Exception as e:  # corrupt, truncated or not a video: named and counted
            logger.debug("VideoClips: %s unreadable: %s: %s", path, type(e).__name__, e)
            self.skipped["unreadable"].append(name)
            return None
        if n < (self.frames - 1) * self._stride(rate) + 1:
            self.skipped["too short"].append(name)
            return None
        caption = None
        if captions:
            caption = captions_of.get(path.resolve()) if captions_of is not None else _caption_beside(path)
            if caption is None:
                self.skipped["no caption"].append(name)
                return None
        return ClipSource(path, n, rate, caption, is_folder)

    # -- items ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sources)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng(None if self.seed is None else [self.seed, i])

    def frame_indices(self, i: int, rng: np.random.Generator) -> list[int]:
        src = self.sources[i]
        stride = self._stride(src.fps)
        span = (self.frames - 1) * stride + 1
        room = src.frames - span
        first = {"first": 0, "center": room // 2}.get(self.start)
        if first is None:
            first = int(rng.integers(0, room + 1))
        return [first + k * stride for k in range(self.frames)]

    def __getitem__(self, i: int) -> dict:
        src = self.sources[i]
        rng = self._rng(i)
        indices = self.frame_indices(i, rng)
        if src.is_folder:
            files = _frame_files(src.path)
            raw = [Image.open(files[j]) for j in indices]
        else:
            raw = [Image.fromarray(f) for f in read_video(src.path, indices)]
        # one crop offset and flip for the whole clip: every frame gets a generator in the same state
        state = int(rng.integers(0, 2 ** 63 - 1))
        video = np.stack([resize_crop(im, self.size, self.crop, self.flip, np.random.default_rng(state)) for im in raw])
        stride = self._stride(src.fps)
        item = {"video": video, "fps": float(src.fps / stride) if src.fps else 0.0, "file_path_": str(src.path)}
        if src.caption is not None:
            item["caption"] = src.caption
        return item


def _frame_files(folder: Path) -> list[Path]:
    """A frame folder's images in name order (zero-padded numbers sort as numbers)."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS),
                  key=lambda p: (len(p.stem), p.stem))


def _caption_beside(path: Path) -> Optional[str]:
    for txt in ((path / "caption.txt", path.with_suffix(".txt")) if path.is_dir() else (path.with_suffix(".txt"),)):
        if txt.is_file():
            return txt.read_text(encoding="utf-8", errors="replace").strip()
    return None


def clip_frames(video: np.ndarray) -> Sequence[np.ndarray]:
    """A (T, H, W, C) clip in [-1, 1] as uint8 frames."""
    return [((f + 1.0) * 127.5).clip(0, 255).round().astype(np.uint8) for f in video]
