"""Video files through PyAV and the clip dataset: written clips read back frame-exact in size and count, strides and
fps, one crop per clip, captions, and unreadable / too-short videos skipped, named and counted."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from ldm.data.video import VideoClips
from ldm.data.video_io import probe_video, read_video, write_gif, write_mp4


def moving_square(t: int, h: int, w: int) -> np.ndarray:
    """uint8 frames of a white square moving right on a dark gradient."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[..., 2] = np.linspace(0, 120, w, dtype=np.uint8)[None, None, :]
    for k in range(t):
        frames[k, h // 3: h // 3 + 6, 2 + 2 * k: 8 + 2 * k] = 255
    return frames


@pytest.mark.parametrize("h,w", [(24, 32), (25, 33)])
def test_mp4_written_reads_back_frame_exact_in_size_and_count(tmp_path, h, w):
    frames = moving_square(9, h, w)
    path = write_mp4(tmp_path / "clip.mp4", frames, fps=12)
    info = probe_video(path)
    assert (info.frames, info.height, info.width) == (9, h, w) and info.fps == pytest.approx(12)
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # H.264 at crf 18: lossy, close
    # the square's column moves as written, frame by frame
    cols = [int(np.argmax(f[h // 3 + 3, :, 0] > 200)) for f in back]
    assert cols == [2 + 2 * k for k in range(9)]
    assert read_video(path, [1, 4, 8]).shape == (3, h, w, 3)
    with pytest.raises(ValueError, match="fewer frames"):
        read_video(path, [3, 20])


def test_gif_written_reads_back(tmp_path):
    frames = moving_square(5, 16, 20)
    path = write_gif(tmp_path / "clip.gif", frames, fps=5)
    assert probe_video(path).frames == 5
    assert read_video(path).shape == (5, 16, 20, 3)


@pytest.fixture()
def video_dir(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    write_mp4(root / "long.mp4", moving_square(16, 40, 48), fps=16)
    (root / "long.txt").write_text("a white square moving right\n")
    write_mp4(root / "short.mp4", moving_square(3, 40, 48), fps=16)
    (root / "short.txt").write_text("too short\n")
    write_mp4(root / "nocap.mp4", moving_square(16, 40, 48), fps=16)
    (root / "broken.mp4").write_bytes(b"\x00\x01 not a video " * 50)
    (root / "broken.txt").write_text("broken")
    folder = root / "frames_clip"
    folder.mkdir()
    for k, f in enumerate(moving_square(10, 40, 48)):
        Image.fromarray(f).save(folder / f"{k}.png")  # 0.png .. 9.png: sorted as numbers, not as text
    (folder / "caption.txt").write_text("frames of a square")
    return root


def test_clips_from_files_and_frame_folders_with_skips_named_and_counted(video_dir, caplog):
    with caplog.at_level(logging.WARNING):
        ds = VideoClips(video_dir, frames=4, frame_stride=2, size=32, start="first")
    assert ds.skipped_counts == {"unreadable": 1, "too short": 1, "no caption": 1}
    assert "broken.mp4" in caplog.text and "short.mp4" in caplog.text and "nocap.mp4" in caplog.text
    assert len(ds) == 2
    items = {item["caption"]: item for item in (ds[i] for i in range(len(ds)))}
    clip = items["a white square moving right"]["video"]
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.float32 and -1 <= clip.min() and clip.max() <= 1
    assert items["a white square moving right"]["fps"] == pytest.approx(8)
    folder_clip = items["frames of a square"]["video"]
    # frames 0, 2, 4, 6 of the folder in numeric order: the square moves 4 px per picked frame (at 48 -> 32 scale)
    rows = folder_clip[:, 32 * (40 // 3 + 3) // 40]
    cols = [int(np.argmax(r[:, 0] > 0.5)) for r in rows]
    assert all(b > a for a, b in zip(cols, cols[1:]))


def test_target_fps_sets_the_stride(video_dir):
    ds = VideoClips(video_dir, frames=3, fps=4, size=32, start="first", captions=False)
    src = next(s for s in ds.sources if s.path.name == "long.mp4")
    i = ds.sources.index(src)
    assert ds.frame_indices(i, np.random.default_rng(0)) == [0, 4, 8] and ds[i]["fps"] == pytest.approx(4)


def test_one_crop_and_flip_for_every_frame(tmp_path):
    root = tmp_path / "still"
    root.mkdir()
    still = np.repeat(moving_square(1, 40, 64), 6, axis=0)  # six identical frames
    write_mp4(root / "still.mp4", still, fps=6)
    ds = VideoClips(root, frames=6, size=24, crop="random", flip=True, captions=False, seed=3)
    for i in range(4):
        clip = VideoClips(root, frames=6, size=24, crop="random", flip=True, captions=False, seed=i)[0]["video"]
        assert np.abs(clip - clip[:1]).max() < 0.1  # codec noise only, no frame cropped or flipped otherwise
    assert ds[0]["video"].shape == (6, 24, 24, 3)


def test_manifest_captions(video_dir):
    (video_dir / "clips.jsonl").write_text(
        json.dumps({"file": "nocap.mp4", "caption": "from the manifest"}) + "\n")
    ds = VideoClips(video_dir, frames=4, size=16, manifest="clips.jsonl")
    assert len(ds) == 1 and ds[0]["caption"] == "from the manifest"


def test_bad_settings_refused(video_dir):
    with pytest.raises(ValueError, match="start 'middle'"):
        VideoClips(video_dir, start="middle")
    with pytest.raises(FileNotFoundError, match="no usable clips of 40 frames"):
        VideoClips(video_dir, frames=40)
