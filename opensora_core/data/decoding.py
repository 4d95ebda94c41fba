"""Decoding the frames one training sample needs: seek near the first, stop after the last.

A sample is ``num_frames`` frames taken every ``interval`` frames from ``start``: frame indices
``start, start + interval, ..., start + (num_frames - 1) * interval``. Decoding a whole clip to
keep a few of its frames wastes most of the work, so the reader

1. seeks the video stream to the keyframe at or before ``start`` (by presentation timestamp,
   ``any_frame=False``: decoding must begin on a keyframe),
2. decodes forward, converting to RGB only the frames it keeps,
3. stops as soon as the last wanted frame is out.

Frame index ``k`` is the frame shown at time ``k / fps``, computed from each decoded frame's
``pts``; with a variable frame rate the frame on screen at that time is taken. When a container
cannot seek to the right place (the first frame after the seek is already past ``start``), the
file is decoded again from its beginning. Images give one frame (T = 1).
This module imports neither torch nor anything heavy.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from opensora_core.data.video_io import is_image_path
from opensora_core.errors import InputError


class DecodeError(InputError):
    """A video or image could not be decoded into the frames a sample asks for."""


def frame_span(num_frames: int, interval: int) -> int:
    """Number of source frames covered by ``num_frames`` frames taken every ``interval``."""
    return (num_frames - 1) * interval + 1


def decode_frames(path: str | Path, start: int = 0, num_frames: int = 1, interval: int = 1) -> np.ndarray:
    """Decode frames ``start, start + interval, ...`` (``num_frames`` of them) of a video or image.

    Returns uint8 RGB frames ``(T, H, W, 3)`` with ``T == num_frames`` for videos and ``T == 1``
    for images (``start``, ``num_frames`` and ``interval`` are ignored for those). Raises
    :class:`DecodeError` when the file is missing, unreadable or shorter than the frames asked for.
    """
    if start < 0 or num_frames < 1 or interval < 1:
        raise ValueError(
            f"need start >= 0, num_frames >= 1, interval >= 1; got {start}, {num_frames}, {interval}"
        )
    path = Path(path)
    if is_image_path(path):
        return _read_image(path)
    frames, _ = _decode_video(path, start, num_frames, interval)
    return frames


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))[None]
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError on some broken headers
        raise DecodeError(f"{path}: cannot read image: {err}") from err


def _decode_video(path: Path, start: int, num_frames: int, interval: int) -> tuple[np.ndarray, int]:
    """Seek-and-decode; returns ``(frames (T, H, W, 3) uint8, frames decoded)``.

    The second value counts every frame the decoder produced (kept or not): it shows how much
    work the seek saved.
    """
    import av

    wanted = list(range(start, start + frame_span(num_frames, interval), interval))
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            origin = stream.start_time or 0
            decoded = 0
            if start > 0 and rate and stream.time_base:
                target = origin + int(Fraction(start) / Fraction(rate) / stream.time_base)
                container.seek(target, stream=stream, any_frame=False, backward=True)
                frames, count = _collect(path, container, stream, wanted, rate, origin, seeked=True)
                decoded += count
                if frames is not None:
                    return frames, decoded
                # The seek landed past the first wanted frame (or frames carry no pts): go back
                # to the start and count frames from there.
                container.seek(origin, stream=stream, any_frame=False, backward=True)
            frames, count = _collect(path, container, stream, wanted, rate, origin, seeked=False)
            decoded += count
    except DecodeError:
        raise
    except (av.FFmpegError, OSError, EOFError, ValueError) as err:
        raise DecodeError(f"{path}: cannot decode video: {err}") from err
    assert frames is not None  # an unseeked pass always returns frames or raises
    return frames, decoded


def _collect(
    path: Path, container: Any, stream: Any, wanted: list[int], rate: Any, origin: int, *, seeked: bool
) -> tuple[np.ndarray | None, int]:
    """Decode forward and keep the frames shown at the ``wanted`` indices.

    Returns ``(None, decoded)`` when, after a seek, the position is unusable: the first frame
    is already past ``wanted[0]``, or frames have no timestamps to place them.
    """
    kept: list[np.ndarray] = []
    previous: tuple[Any, int] | None = None  # (frame, index) of the last frame decoded
    last_rgb: list[Any] = [None, None]  # [frame, its RGB array]: a repeated frame converts once
    index = -1
    decoded = 0

    def rgb(frame: Any) -> np.ndarray:
        if last_rgb[0] is not frame:
            last_rgb[:] = [frame, frame.to_ndarray(format="rgb24")]
        return last_rgb[1]

    for decoded, frame in enumerate(container.decode(stream), start=1):
        if frame.pts is None or not rate:
            if seeked:
                return None, decoded
            index += 1  # no timestamps: frames are counted from the start of the file
        else:
            index = round(Fraction(frame.pts - origin) * stream.time_base * Fraction(rate))
        if seeked and previous is None and index > wanted[0]:
            return None, decoded
        # Every wanted index at or before this frame is filled now: with the frame itself on an
        # exact match, else with the frame still on screen at that time (the previous one).
        while len(kept) < len(wanted) and wanted[len(kept)] <= index:
            target = wanted[len(kept)]
            source = frame if index == target or previous is None else previous[0]
            kept.append(rgb(source))
        if len(kept) == len(wanted):
            return np.stack(kept), decoded
        previous = (frame, index)
    if seeked and previous is None:
        return None, decoded  # the seek went past the last frame: let a full pass tell
    if previous is None:
        raise DecodeError(f"{path}: no frames decoded")
    raise DecodeError(
        f"{path}: video has frames up to index {index}, but the sample needs frames {wanted[0]}..{wanted[-1]}"
        f" every {wanted[1] - wanted[0] if len(wanted) > 1 else 1}"
    )
