"""The videos inference makes and reads: their shape (:class:`VideoSpec`, from a training config or
a resolution name), reference images and videos for the i2v / v2v conditions, and uint8 frames."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opensora_core.data.buckets import ASPECT_RATIOS, aspect_ratio_table, closest_ratio, parse_bucket_config
from opensora_core.data.dataset import prepare_video
from opensora_core.data.video_io import read_video
from opensora_core.errors import ConfigError, InputError
from opensora_core.inference.run_config import last_stage_config


@dataclass
class VideoSpec:
    """Shape and rate of the videos to generate."""

    num_frames: int = 9
    """Frames per video: 1 (a still, PNG) or 4k+1 for the causal VAE."""
    height: int = 64
    """Pixel height (a multiple of the VAE factor times the patch size)."""
    width: int = 64
    """Pixel width."""
    fps: float = 8.0
    """Frames per second of the written mp4."""

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.height < 1 or self.width < 1 or self.fps <= 0:
            raise ConfigError(f"invalid video spec {self}")


def default_video_spec(config: Mapping[str, Any], spatial_factor: int, fps: float = 8.0) -> VideoSpec:
    """The last diffusion stage's largest video bucket (T > 1) at aspect ratio 1, else 9 x 64 x 64.

    ``spatial_factor`` is the VAE factor times the patch size: sides are multiples of it.
    """
    stage = last_stage_config(config)
    buckets = stage.get("buckets")
    if isinstance(buckets, Mapping) and buckets:
        try:
            entries = parse_bucket_config(buckets)
        except ConfigError:
            entries = []
        videos = [e for e in entries if e[1] > 1] or entries
        if videos:
            resolution, num_frames = videos[0][0], videos[0][1]
            h, w = aspect_ratio_table(resolution, spatial_factor)[1.0]
            return VideoSpec(num_frames, h, w, fps)
    return VideoSpec(9, 64, 64, fps)


def video_size(resolution: str, aspect_ratio: str, spatial_factor: int) -> tuple[int, int]:
    """(height, width) of a resolution name (``64px``, ``480p``) at ``aspect_ratio`` (``9:16``, ``0.75``)."""
    ratio_text = aspect_ratio.strip()
    try:
        if ":" in ratio_text:
            a, b = ratio_text.split(":")
            ratio = float(a) / float(b)
        else:
            ratio = float(ratio_text)
    except ValueError as exc:
        raise ConfigError(f"aspect ratio must be H:W or a number, got {aspect_ratio!r}") from exc
    if ratio <= 0:
        raise ConfigError(f"aspect ratio must be positive, got {aspect_ratio!r}")
    table = aspect_ratio_table(resolution, spatial_factor)
    return table[closest_ratio(ratio, 1.0, ASPECT_RATIOS)]


def load_reference(path: str | Path) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 of a reference image (T = 1) or video; InputError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference not found: {path}")
    try:
        frames, _ = read_video(path)
    except Exception as exc:  # PIL / PyAV errors of every kind
        raise InputError(f"reference {path} could not be read: {exc}") from exc
    return frames


def prepare_reference(frames: np.ndarray, cond_type: str, video: VideoSpec) -> torch.Tensor:
    """A (1, 3, T, H, W) video in [-1, 1] whose conditioned frames come from ``frames`` (Tr, H0, W0, 3).

    An image fills every frame. From a video, i2v types take its first frame (``i2v_tail`` its
    last), v2v types its first T frames (``v2v_tail`` its last T), repeating the edge frame when
    it is shorter. The VAE encodes the result; the condition mask then keeps the given frames.
    """
    clip = prepare_video(np.asarray(frames, dtype=np.uint8), video.height, video.width)  # (3, Tr, H, W)
    t_ref, t = clip.shape[1], video.num_frames
    if t_ref == 1 or cond_type.startswith("i2v"):
        pick = clip[:, -1:] if cond_type == "i2v_tail" else clip[:, :1]
        return pick.expand(3, t, *pick.shape[2:]).unsqueeze(0).contiguous()
    if cond_type == "v2v_tail":
        part = clip[:, -t:]
        pad = clip[:, :1].expand(3, t - part.shape[1], *clip.shape[2:])
        return torch.cat([pad, part], dim=1).unsqueeze(0)
    part = clip[:, :t]
    pad = clip[:, -1:].expand(3, t - part.shape[1], *clip.shape[2:])
    return torch.cat([part, pad], dim=1).unsqueeze(0)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()
