"""Probing real files written here with PyAV and Pillow: exact metadata, and every broken kind."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from opensora_core.data.probe import META_COLUMNS, STATUSES, probe_file, probe_table
from opensora_core.data.video_io import write_image, write_video


def moving_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8: a gradient that moves, plus noise, so every frame differs."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_frames)[:, None, None, None]
    x = np.arange(width)[None, None, :, None]
    y = np.arange(height)[None, :, None, None]
    base = (x * 3 + y * 2 + t * 9 + np.array([0, 80, 160])) % 256
    return (base + rng.integers(0, 20, (num_frames, height, width, 3))).clip(0, 255).astype(np.uint8)


def write_container(path: Path, frames: np.ndarray, fps: int) -> Path:
    """h264 in the container the suffix names (mkv, ts, flv, ...), written with PyAV directly."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_audio_only(path: Path) -> Path:
    """An AAC track in an mp4 container, with no video stream."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(8):
            samples = np.sin(np.arange(1024, dtype=np.float32) / 8.0)[None]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


# (name, num_frames, height, width, fps)
VIDEOS = [
    ("a.mp4", 17, 48, 64, 12),
    ("b.mp4", 33, 64, 96, 24),
    ("ntsc.mp4", 25, 64, 64, Fraction(30000, 1001)),
]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    for i, (name, t, h, w, fps) in enumerate(VIDEOS):
        write_video(root / name, moving_frames(t, h, w, seed=i), float(fps), faststart=True)
    still = moving_frames(1, 40, 56)[0]
    write_image(root / "still.png", still)
    write_image(root / "still.jpg", still)
    write_video(root / "web.mp4", moving_frames(33, 64, 96), 24, faststart=True)
    cut(root / "web.mp4", root / "web_cut.mp4", 0.6)
    write_video(root / "plain.mp4", moving_frames(33, 64, 96), 24)  # index at the end
    cut(root / "plain.mp4", root / "plain_cut.mp4", 0.6)
    for suffix in ("mkv", "ts", "flv"):
        write_container(root / f"clip.{suffix}", moving_frames(33, 64, 96), 24)
    cut(root / "clip.mkv", root / "clip_cut.mkv", 0.6)
    cut(root / "still.png", root / "still_cut.png", 0.5)
    (root / "zero.mp4").write_bytes(b"")
    (root / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "notes.mp4").write_text("this is a caption file, not a video\n" * 40)
    write_video(root / "a clip — été 夏.mp4", moving_frames(9, 32, 32), 8, faststart=True)
    return root


@pytest.mark.parametrize(("name", "num_frames", "height", "width", "fps"), VIDEOS)
def test_video_metadata_is_exact(
    media: Path, name: str, num_frames: int, height: int, width: int, fps
) -> None:
    res = probe_file(media / name)
    assert (res.status, res.error) == ("ok", "")
    assert res.num_frames == num_frames
    assert (res.height, res.width) == (height, width)
    assert res.fps == pytest.approx(float(fps), rel=1e-6)
    assert res.duration == pytest.approx(num_frames / float(fps), rel=1e-3)
    assert res.codec == "h264"
    row = res.as_row()
    assert row["aspect_ratio"] == pytest.approx(height / width)
    assert row["resolution"] == height * width


@pytest.mark.parametrize(("name", "codec"), [("still.png", "png"), ("still.jpg", "jpeg")])
def test_still_image_is_one_frame_without_rate(media: Path, name: str, codec: str) -> None:
    res = probe_file(media / name)
    assert res.status == "ok"
    assert (res.num_frames, res.height, res.width, res.codec) == (1, 40, 56, codec)
    assert math.isnan(res.fps) and math.isnan(res.duration)


def test_cut_faststart_mp4_is_truncated_with_both_counts(media: Path) -> None:
    whole = probe_file(media / "web.mp4")
    res = probe_file(media / "web_cut.mp4")
    assert whole.status == "ok" and whole.num_frames == 33
    assert res.status == "truncated"
    # The header still claims 33 frames; fewer packets are really there.
    assert 0 < res.num_frames < 33
    assert str(res.num_frames) in res.error and "33" in res.error
    assert (res.height, res.width, res.fps) == (64, 96, 24.0)


def test_cut_mp4_with_index_at_the_end_cannot_open(media: Path) -> None:
    res = probe_file(media / "plain_cut.mp4")
    assert res.status == "unreadable"
    assert res.num_frames is None and "cannot open" in res.error


@pytest.mark.parametrize("suffix", ["mkv", "ts", "flv"])
def test_containers_without_a_frame_count(media: Path, suffix: str) -> None:
    # No frame count in the header: checked against duration * fps. MPEG-TS states no rate in a
    # header at all, so it takes FFmpeg's full stream analysis; FLV's duration includes the
    # B-frame start offset, which must not read as missing frames.
    res = probe_file(media / f"clip.{suffix}")
    assert (res.status, res.error) == ("ok", "")
    assert (res.num_frames, res.height, res.width, res.fps) == (33, 64, 96, 24.0)


def test_cut_mkv_is_truncated_against_duration_times_fps(media: Path) -> None:
    res = probe_file(media / "clip_cut.mkv")
    assert res.status == "truncated"
    assert res.num_frames < 33 and "33" in res.error and str(res.num_frames) in res.error


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("zero.mp4", "empty"),
        ("noise.mp4", "unreadable"),
        ("notes.mp4", "unreadable"),
        ("does-not-exist.mp4", "missing"),
        ("still_cut.png", "truncated"),
    ],
)
def test_broken_files_get_a_status_and_a_sentence(media: Path, name: str, status: str) -> None:
    res = probe_file(media / name)
    assert res.status == status
    assert len(res.error) > 10


def test_directory_and_empty_path(media: Path) -> None:
    assert probe_file(media).status == "unreadable"
    assert probe_file("").status == "missing"
    assert probe_file(float("nan")).status == "missing"


def test_audio_only_file_has_no_video(tmp_path: Path) -> None:
    if "aac" not in av.codecs_available:
        pytest.skip("this PyAV build has no AAC encoder")
    res = probe_file(write_audio_only(tmp_path / "speech.m4a"))
    assert res.status == "no_video"
    assert "audio" in res.error


def test_name_with_spaces_and_non_ascii(media: Path) -> None:
    res = probe_file(media / "a clip — été 夏.mp4")
    assert (res.status, res.num_frames, res.height, res.width) == ("ok", 9, 32, 32)


def test_table_keeps_order_and_serial_equals_two_workers(media: Path) -> None:
    names = [
        "b.mp4",
        "zero.mp4",
        "still.png",
        "web_cut.mp4",
        "missing.mp4",
        "noise.mp4",
        "a.mp4",
        "notes.mp4",
        "ntsc.mp4",
    ]
    paths = [str(media / n) for n in names]
    serial = probe_table(paths, num_workers=0, progress=False)
    parallel = probe_table(paths, num_workers=2, progress=False)
    assert list(serial.columns) == list(META_COLUMNS)
    assert serial["status"].tolist() == [
        "ok",
        "empty",
        "ok",
        "truncated",
        "missing",
        "unreadable",
        "ok",
        "unreadable",
        "ok",
    ]
    assert set(serial["status"]) <= set(STATUSES)
    assert serial.loc[0, "num_frames"] == 33 and serial.loc[2, "num_frames"] == 1
    assert serial.loc[[1, 4, 5], ["num_frames", "height", "width"]].isna().all(axis=None)
    pd.testing.assert_frame_equal(serial, parallel)


def test_empty_table_has_the_columns() -> None:
    table = probe_table([], num_workers=2, progress=False)
    assert len(table) == 0 and list(table.columns) == list(META_COLUMNS)
