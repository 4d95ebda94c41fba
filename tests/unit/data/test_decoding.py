from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from opensora_core.data.decoding import DecodeError, _decode_video, decode_frames, frame_span
from opensora_core.data.video_io import read_video, write_image, write_video

NUM_FRAMES, HEIGHT, WIDTH = 33, 48, 64


def moving_frames(num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Frames that differ from each other: a brightness ramp and a square that moves."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t, :, :, 0] = (t * 7) % 256
        frames[t, :, :, 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
        y, x = (t % 5) * 8, (t * 3) % (width - 8)
        frames[t, y : y + 8, x : x + 8] = 255
    return frames


def write_keyframed_video(path: Path, frames: np.ndarray, fps: int, gop: int) -> Path:
    """An h264 mp4 with a keyframe every ``gop`` frames (so a seek lands mid-file)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"crf": "18", "preset": "veryfast", "sc_threshold": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoding")
    frames = moving_frames()
    return {
        "plain": write_video(root / "plain.mp4", frames, fps=12),
        "keyframed": write_keyframed_video(root / "keyframed.mp4", frames, fps=24, gop=8),
        "still": write_image(root / "still.png", frames[3]),
    }


WINDOWS = [
    (0, 9, 1),
    (0, 33, 1),
    (5, 8, 3),
    (10, 5, 4),
    (17, 1, 1),
    (24, 3, 2),
    (32, 1, 1),
    (0, 17, 2),
    (1, 16, 2),
]


@pytest.mark.parametrize("name", ["plain", "keyframed"])
def test_windows_equal_the_matching_frames_of_a_full_decode(clips: dict[str, Path], name: str) -> None:
    full, _ = read_video(clips[name])
    assert full.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    for start, num_frames, interval in WINDOWS:
        out = decode_frames(clips[name], start, num_frames, interval)
        expected = full[start : start + frame_span(num_frames, interval) : interval]
        assert out.dtype == np.uint8 and out.shape == (num_frames, HEIGHT, WIDTH, 3)
        np.testing.assert_array_equal(out, expected, err_msg=f"window {start, num_frames, interval}")


def test_seek_decodes_from_the_nearest_keyframe_and_stops_early(clips: dict[str, Path]) -> None:
    # Keyframes at 0, 8, 16, 24, 32: frame 26 needs frames 24..26 decoded, not 0..26.
    _, decoded = _decode_video(clips["keyframed"], 26, 1, 1)
    assert decoded == 3
    # From the start, decoding stops at the last wanted frame instead of running to the end.
    _, decoded = _decode_video(clips["keyframed"], 0, 3, 2)
    assert decoded == 5


def test_image_gives_one_frame(clips: dict[str, Path]) -> None:
    out = decode_frames(clips["still"], start=4, num_frames=9, interval=2)
    assert out.shape == (1, HEIGHT, WIDTH, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], moving_frames()[3])


def test_window_past_the_end_raises_decode_error(clips: dict[str, Path]) -> None:
    with pytest.raises(DecodeError, match="frames up to index 32"):
        decode_frames(clips["keyframed"], start=30, num_frames=4, interval=1)


def test_corrupt_and_missing_files_raise_decode_error(tmp_path: Path, clips: dict[str, Path]) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clips["plain"].read_bytes()[:1500])
    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for path in (garbage, truncated, broken_png, tmp_path / "missing.mp4"):
        with pytest.raises(DecodeError, match=path.name):
            decode_frames(path, 0, 4)


def test_bad_arguments_are_rejected(clips: dict[str, Path]) -> None:
    for start, num_frames, interval in [(-1, 1, 1), (0, 0, 1), (0, 1, 0)]:
        with pytest.raises(ValueError):
            decode_frames(clips["plain"], start, num_frames, interval)
