"""The moving-shapes video dataset and its evaluator: captions parse, tracks stay in frame and move as captioned, the
evaluator reads the data back exactly and catches reversed motion, a changed colour and a still clip."""
from __future__ import annotations

import numpy as np
import pytest

from ldm.data.moving_shapes import MOTION_NAMES, MovingShapes, parse_video_caption, render_clip, sample_clip_spec
from ldm.eval.video_shapes import motion_of, read_clip, score_clips


def test_captions_parse_and_tracks_move_as_captioned_inside_the_frame():
    ds = MovingShapes(size=32, frames=8, num_samples=200)
    seen = set()
    for i in range(len(ds)):
        spec = ds.spec(i)
        want = parse_video_caption(spec.caption)
        assert (want["shape"], want["color"], want["size"], want["motion"]) == (spec.shape, spec.color, spec.size,
                                                                                spec.motion)
        xs, ys = zip(*spec.track)
        assert 0 < min(xs) and max(xs) < 32 and 0 < min(ys) and max(ys) < 32
        seen.add(spec.motion)
    assert seen == set(MOTION_NAMES)
    item = ds[0]
    assert item["video"].shape == (8, 32, 32, 3) and item["video"].dtype == np.float32
    assert MovingShapes(num_samples=3, seed=4)[2]["caption"] == MovingShapes(num_samples=3, seed=4)[2]["caption"]


def test_image_items_are_independent_stills_of_one_description():
    ds = MovingShapes(frames=6, num_samples=60, image_prob=0.5)
    images = [i for i in range(len(ds)) if ds[i]["image_only_indicator"] == 1.0]
    assert 15 < len(images) < 45
    item = ds[images[0]]
    assert "moving" not in item["caption"] and "still" not in item["caption"]
    readings = read_clip(item["video"])
    assert len({r.center for r in readings}) > 1  # placed anew in each frame
    assert len({(r.shape, r.color, r.size) for r in readings}) == 1


def test_evaluator_reads_the_data_back_and_catches_errors():
    ds = MovingShapes(frames=8, split="validation", num_samples=60)
    clips = [ds[i]["video"] for i in range(len(ds))]
    prompts = [ds[i]["caption"] for i in range(len(ds))]
    assert score_clips(clips, prompts) == {"frame_shape": 1.0, "frame_color": 1.0, "frame_size": 1.0,
                                           "frame_all": 1.0, "motion": 1.0, "consistency": 1.0, "all": 1.0, "n": 60}
    rng = np.random.default_rng(0)
    spec = sample_clip_spec(rng, 32, 8, {"motion": "right", "color": "red", "shape": "square", "size": "large"})
    clip = render_clip(spec, 32)
    assert motion_of(read_clip(clip)) == "right" and motion_of(read_clip(clip[::-1])) == "left"
    changed = clip.copy()
    changed[3] = render_clip(sample_clip_spec(rng, 32, 1, {"color": "blue", "shape": "square", "size": "large",
                                                           "motion": "still"}), 32)[0]
    got = score_clips([clip, clip[::-1], changed, np.repeat(clip[:1], 8, 0)], [spec.caption] * 4)
    assert got["motion"] == pytest.approx(0.5) and got["consistency"] == pytest.approx(0.75)
    assert got["frame_color"] == pytest.approx(1 - 1 / 32)
