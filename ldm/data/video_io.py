"""Reading and writing clips through PyAV (FFmpeg's demuxers and codecs; its wheels carry FFmpeg, so it installs from
the package index alone and reads mp4 / webm / mkv / mov / gif with the same calls); GIFs are written with Pillow."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif")
# MP4 as H.264 (libx264, in PyAV's wheels) at constant quality; 4:2:0 chroma needs even sides, 4:4:4 takes any
MP4_CODEC, MP4_CRF = "libx264", 18


@dataclass(frozen=True)
class VideoInfo:
    """A file's frame count (decoded when the container does not say) and frame rate."""
    frames: int
    fps: float
    width: int
    height: int


def _av():
    try:
        import av
    except ImportError as e:  # a dependency of the package; a broken install says so
        raise ImportError("reading and writing video needs PyAV (`pip install av`, a dependency of ldm)") from e
    return av


def probe_video(path: Union[str, Path]) -> VideoInfo:
    """Frame count, fps and size of a video file (an unreadable file raises the reader's error)."""
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        n = int(stream.frames or 0)
        if n <= 0:  # webm / gif containers often do not store the count
            n = sum(1 for _ in container.decode(stream))
        return VideoInfo(n, float(rate) if rate else 0.0, int(stream.codec_context.width),
                         int(stream.codec_context.height))


def read_video(path: Union[str, Path], indices: Optional[Sequence[int]] = None) -> np.ndarray:
    """Frames of a video file as uint8 (T, H, W, 3) RGB: all, or those at `indices` (increasing)."""
    av = _av()
    wanted = None if indices is None else list(indices)
    out: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        pick = iter(wanted) if wanted is not None else None
        target = next(pick, None) if pick is not None else None
        for i, frame in enumerate(container.decode(stream)):
            if pick is None:
                out.append(frame.to_ndarray(format="rgb24"))
                continue
            if target is None:
                break
            if i == target:
                out.append(frame.to_ndarray(format="rgb24"))
                target = next(pick, None)
    if wanted is not None and len(out) != len(wanted):
        raise ValueError(f"{path}: has fewer frames than asked for ({len(out)} of {len(wanted)} read)")
    if not out:
        raise ValueError(f"{path}: no frames decoded")
    return np.stack(out)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, C) in uint8 or floats in [0, 1] -> uint8 RGB."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if frames.ndim != 4:
        raise ValueError(f"frames of shape {frames.shape}; expected (T, H, W, C)")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])


def write_mp4(path: Union[str, Path], frames: np.ndarray, fps: float) -> Path:
    """An H.264 MP4 of (T, H, W, C) frames at `fps` (every frame kept, its size exact)."""
    av = _av()
    frames = to_uint8(frames)
    t, h, w, _ = frames.shape
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(MP4_CODEC, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        stream.options = {"crf": str(MP4_CRF)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(path: Union[str, Path], frames: np.ndarray, fps: float) -> Path:
    """A looping GIF of the frames (Pillow)."""
    frames = to_uint8(frames)
    images = [Image.fromarray(f) for f in frames]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000.0 / fps)), loop=0)
    return path
