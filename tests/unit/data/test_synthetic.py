"""MovingShapes: determinism, held-out combinations, captions, and labels that match the pixels."""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np
import pytest

from opensora_core.config import IngestConfig
from opensora_core.data import synthetic
from opensora_core.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    SHAPES,
    centroid_track,
    dominant_color,
    foreground_mask,
    held_out_combos,
    motion_of_track,
    plan_samples,
    render,
    track_travel,
    write_sample,
)
from opensora_core.data.video_io import read_video
from opensora_core.errors import ConfigError

SMALL_SIZES = [[32, 32], [32, 48], [48, 32]]

# Words that name each motion in a caption.
MOTION_WORDS = {
    "left": r"\bleft(ward)?\b",
    "right": r"\bright(ward)?\b",
    "up": r"\bup(ward)?\b",
    "down": r"\bdown(ward)?\b",
    "static": r"\b(still|motionless|in place|not move)\b",
}


def small_cfg(**overrides) -> IngestConfig:
    base = {"num_clips": 24, "num_stills": 8, "val_combos": 3, "sizes": SMALL_SIZES, "num_frames": [9]}
    return IngestConfig(**{**base, **overrides})


def every_combo_once() -> list[synthetic.ShapeSample]:
    """With nothing held out, 90 clips cover each (shape, colour, motion) exactly once."""
    n = len(synthetic.all_combos())
    samples = plan_samples(small_cfg(num_clips=n, num_stills=0, val_combos=0, num_frames=[9, 17]))
    assert sorted(s.combo for s in samples) == sorted(synthetic.all_combos())
    return samples


def test_tables_are_separable():
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert len(COLORS) >= 6
    # (dy, dx) in image coordinates: rows grow downwards.
    assert MOTIONS == {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "static": (0, 0)}
    # Shapes are bright, backgrounds dark: one brightness threshold tells them apart.
    assert min(max(rgb) for rgb in COLORS.values()) >= 200
    assert max(max(c) for pair in BACKGROUNDS.values() for c in pair) <= 80
    # Colours are far apart from each other.
    table = np.array(list(COLORS.values()), dtype=float)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(table, 2)]
    assert min(dists) > 120


def test_same_seed_same_samples_and_frames_other_seed_differs():
    a, b = plan_samples(small_cfg(seed=7)), plan_samples(small_cfg(seed=7))
    assert a == b
    for s, t in zip(a[:5], b[:5]):
        np.testing.assert_array_equal(render(s), render(t))
    other = plan_samples(small_cfg(seed=8))
    assert [s.text for s in other] != [s.text for s in a]
    assert not np.array_equal(render(other[0]), render(a[0]))
    assert held_out_combos(6, 7) == held_out_combos(6, 7) != held_out_combos(6, 8)


def test_written_files_are_faithful_and_png_bytes_deterministic(tmp_path):
    samples = plan_samples(small_cfg(num_clips=6, num_stills=2, val_combos=1))
    for s in samples:
        first, second = write_sample(s, tmp_path / "a"), write_sample(s, tmp_path / "b")
        decoded, _ = read_video(first)
        # crf 18 keeps the clip close to the rendered frames (exact for PNG).
        err = np.abs(decoded.astype(int) - render(s).astype(int))
        assert err.mean() < (4.0 if s.kind == "clip" else 1e-9), s
        if s.kind == "still":
            assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_val_combos_are_held_out_whole_and_all_present(seed):
    cfg = small_cfg(num_clips=40, num_stills=60, val_combos=4, seed=seed)
    samples = plan_samples(cfg)
    held_out = set(held_out_combos(4, seed))
    clips = [s for s in samples if s.kind == "clip"]
    assert len(clips) == 40 and len(samples) == 100
    val_clips = [s for s in clips if s.split == "val"]
    train_combos = {s.combo for s in samples if s.split == "train"}
    assert {s.combo for s in val_clips} == held_out
    assert not train_combos & held_out
    assert all(n >= 2 for n in np.unique([str(s.combo) for s in val_clips], return_counts=True)[1])
    # Stills are static; their split follows their (shape, colour, "static") combination.
    for still in (s for s in samples if s.kind == "still"):
        assert still.motion == "static" and still.num_frames == 1
        assert still.split == ("val" if still.combo in held_out else "train")


def test_train_combos_cover_before_repeating():
    cfg = small_cfg(num_clips=100, num_stills=0, val_combos=5)
    clips = [s for s in plan_samples(cfg) if s.split == "train"]
    combos = {s.combo for s in clips}
    assert len(combos) == len(synthetic.all_combos()) - 5  # 85 train clips > 85 combos: all present


def test_too_few_clips_for_held_out_combos_is_a_config_error():
    with pytest.raises(ConfigError, match="num_clips=5 is too small"):
        plan_samples(small_cfg(num_clips=5, val_combos=3))
    with pytest.raises(ConfigError, match="val_combos"):
        held_out_combos(len(synthetic.all_combos()), 0)


def test_val_pairs_keep_a_word_and_a_shape_apart_in_training():
    cfg = small_cfg(num_clips=80, num_stills=40, val_combos=2, val_pairs=["red circle", "up triangle"])
    samples = plan_samples(cfg)
    held = set(held_out_combos(2, cfg.seed, cfg.val_pairs))
    # red circles under every motion (5) and upward triangles of every colour (6), plus 2 drawn ones
    assert {c for c in held if c[0] == "circle" and c[1] == "red"} == {("circle", "red", m) for m in MOTIONS}
    assert {c for c in held if c[0] == "triangle" and c[2] == "up"} == {("triangle", c, "up") for c in COLORS}
    assert len(held) >= 11
    train = [s for s in samples if s.split == "train"]
    assert not any(s.shape == "circle" and s.color == "red" for s in train)
    assert not any(s.shape == "triangle" and s.motion == "up" for s in train)
    # the words themselves still train, with the other shapes
    assert any(s.color == "red" for s in train) and any(s.motion == "up" for s in train)
    assert {s.combo for s in samples if s.split == "val" and s.kind == "clip"} == held
    assert sum(s.split == "val" for s in samples if s.kind == "clip") >= 2 * len(held)  # 2 clips each
    with pytest.raises(ConfigError, match=r"num_clips=9 is too small for 5 held-out"):
        plan_samples(small_cfg(num_clips=9, val_combos=0, val_pairs=["red circle"]))
    # no pairs: the same draw as before
    assert held_out_combos(4, 3, []) == held_out_combos(4, 3)


def test_bad_val_pairs_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"ingest\.val_pairs.*'purple circle'"):
        plan_samples(small_cfg(num_clips=40, val_pairs=["purple circle"]))
    with pytest.raises(ConfigError, match=r"ingest\.val_pairs"):
        IngestConfig(val_pairs=["red"])


def test_config_rejects_odd_sizes_and_frame_counts():
    with pytest.raises(ConfigError, match="even"):
        IngestConfig(sizes=[[33, 32]])
    with pytest.raises(ConfigError, match="4k\\+1"):
        IngestConfig(num_frames=[8])


def test_captions_name_colour_shape_motion_and_background():
    samples = every_combo_once() + plan_samples(small_cfg(num_clips=0, num_stills=30, val_combos=0))
    for s in samples:
        assert re.search(rf"\b{s.color} {s.shape}\b", s.text), s.text
        assert s.background in s.text, s.text
        if s.kind == "clip":
            assert re.search(MOTION_WORDS[s.motion], s.text), s.text
            others = [m for m in MOTIONS if m != s.motion]
            assert not any(re.search(MOTION_WORDS[m], s.text) for m in others), s.text
    # Varied wording: several sentence forms and several verbs per motion.
    left = {s.text.split(" background")[0] for s in samples if s.motion == "left"}
    assert len({s.text.split()[0] for s in samples}) >= 3
    assert len(left) >= 3


def test_rendered_shapes_stay_inside_and_move_as_labelled():
    for s in every_combo_once():
        frames = render(s)
        assert frames.shape == (s.num_frames, s.height, s.width, 3)
        mask = foreground_mask(frames)
        assert mask.any(axis=(1, 2)).all(), s
        border = mask[:, [0, -1], :].any() or mask[:, :, [0, -1]].any()
        assert not border, f"{s.name} touches the frame edge"
        # The shape stays within `size` of its labelled centre (what keeps it inside the frame).
        for m, (cy, cx) in zip(mask, s.centers()):
            ys, xs = np.nonzero(m)
            assert np.abs(ys - cy).max() <= s.size + 0.5 and np.abs(xs - cx).max() <= s.size + 0.5, s
        track = centroid_track(frames)
        disp = track[-1] - track[0]
        expected = s.speed * (s.num_frames - 1) * np.array(MOTIONS[s.motion])
        np.testing.assert_allclose(disp, expected, atol=1.0)
        axis = s.height if MOTIONS[s.motion][0] else s.width
        if s.motion != "static":
            assert np.abs(disp).max() >= 0.2 * axis, f"{s.name}: motion too small to see"
        assert motion_of_track(track) == s.motion
        assert dominant_color(frames) == s.color


def test_track_travel_fits_a_line_through_every_frame() -> None:
    t = np.arange(17, dtype=np.float64)
    line = np.stack([np.full(17, 20.0), 10.0 + 1.5 * t], axis=1)  # 24 px to the right
    np.testing.assert_allclose(track_travel(line), [0.0, 24.0], atol=1e-9)
    # A stray last frame flips first-to-last to the left; the fit still says right.
    stray = line.copy()
    stray[-1, 1] = 5.0
    assert stray[-1, 1] - stray[0, 1] < 0
    assert motion_of_track(stray) == "right"
    # Frames without foreground (NaN) are skipped; under two valid frames nothing moved.
    gaps = line.copy()
    gaps[[0, 5, 16]] = np.nan
    np.testing.assert_allclose(track_travel(gaps), [0.0, 24.0], atol=1e-9)
    np.testing.assert_array_equal(track_travel(np.full((9, 2), np.nan)), [0.0, 0.0])
    # A still shape that wobbles by +-2 px is static under evaluation's threshold at 48 px.
    wobble = np.stack([24 + 2 * np.sin(t), 24 + 2 * np.cos(1.3 * t)], axis=1)
    assert motion_of_track(wobble, synthetic.STATIC_SHARE * 48) == "static"
    assert motion_of_track(line, synthetic.STATIC_SHARE * 48) == "right"


def test_labels_match_decoded_mp4_pixels(tmp_path):
    samples = every_combo_once()
    for s in samples:
        frames, fps = read_video(write_sample(s, tmp_path))
        assert frames.shape == (s.num_frames, s.height, s.width, 3)
        assert fps == pytest.approx(s.fps)
        assert dominant_color(frames) == s.color, s
        # The background stays background after h264: nearly all pixels outside the shape.
        clean = render(s)
        agree = (foreground_mask(frames) == foreground_mask(clean)).mean()
        assert agree > 0.98, s
        track = centroid_track(frames)
        assert motion_of_track(track) == s.motion, s
        if s.motion == "static":
            assert np.abs(track - track[0]).max() < 0.5
        else:
            direction = np.array(MOTIONS[s.motion])
            along = (track[-1] - track[0]) @ direction
            across = (track[-1] - track[0]) @ direction[::-1]
            assert along == pytest.approx(s.speed * (s.num_frames - 1), abs=1.0)
            assert abs(across) < 1.0


def test_stills_are_single_frame_pngs(tmp_path):
    stills = plan_samples(small_cfg(num_clips=0, num_stills=6, val_combos=0))
    for s in stills:
        path = write_sample(s, tmp_path)
        assert path.suffix == ".png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        frames, _ = read_video(path)
        assert frames.shape == (1, s.height, s.width, 3)
        np.testing.assert_array_equal(frames, render(s))  # PNG is lossless
        assert dominant_color(frames) == s.color


def test_label_row_holds_the_ground_truth():
    s = plan_samples(small_cfg(num_clips=6, num_stills=0, val_combos=1))[0]
    row = s.label_row()
    assert tuple(row) == synthetic.LABEL_COLUMNS
    assert row["color_rgb"] == list(COLORS[s.color])
    assert (row["direction_y"], row["direction_x"]) == MOTIONS[s.motion]
    assert row["path"] == f"clips/{s.name}.mp4"
    assert {k: row[k] for k in ("size", "start_y", "start_x", "speed")} == {
        k: v for k, v in dataclasses.asdict(s).items() if k in ("size", "start_y", "start_x", "speed")
    }
