"""Writing and reading whole videos and images with PyAV and Pillow.

Frames are ``uint8`` arrays shaped ``(T, H, W, 3)`` (RGB). Videos are written as h264 mp4
(yuv420p, so height and width must be even); one-frame stills as PNG. These helpers decode
every frame: the training dataset seeks and decodes only what it needs instead.
This module imports neither torch nor anything heavy.
"""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif")


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of the bytes of ``path``, read ``block`` bytes at a time (meta's per-file
    fingerprint, shard, checkpoint and weight hashes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    *,
    codec: str = "libx264",
    crf: int = 18,
    faststart: bool = False,
) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 as an mp4; returns the path.

    ``crf`` 18 keeps small synthetic clips close to lossless; ``fps`` may be fractional.
    ``faststart`` moves the index (moov atom) to the front, as web videos are stored.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"h264 yuv420p needs even height and width, got {height}x{width}")
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    container_options = {"movflags": "+faststart"} if faststart else None
    with av.open(str(path), mode="w", container_options=container_options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        # One thread per encoder: callers parallelise over files, not inside one.
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image(path: str | Path, frame: np.ndarray) -> Path:
    """Write one (H, W, 3) uint8 frame as an image (format from the suffix, PNG by default)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(path)
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame: returns ``(frames (T, H, W, 3) uint8, fps)``. Images give T = 1."""
    path = Path(path)
    if is_image_path(path):
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))[None], 0.0
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return np.stack(frames), fps
