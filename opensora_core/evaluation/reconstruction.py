"""VAE reconstruction checks: encode and decode clips, score them against the temporal-mean baseline.

Scores over a set of clips (:class:`ReconstructionResult`):

- ``psnr``: ``10 log10(4 / MSE)`` with the MSE pooled over every value of every clip (range
  ``[-1, 1]``). Pooling keeps clips that do not move, whose baseline error is zero, from turning
  a per-clip average into infinity.
- ``psnr_baseline``: the same with each clip replaced by its per-pixel temporal mean
  (:func:`~opensora_core.evaluation.video_metrics.temporal_mean_baseline`): a reconstruction
  below it did not even keep the motion.
- ``ssim``: SSIM per clip, averaged over clips.

The training stage, the evaluate stage and ``tasks.vae_reconstruct`` share these functions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from opensora_core.evaluation.video_metrics import MSE_FLOOR, ssim, temporal_mean_baseline

DATA_RANGE = 2.0
SSIM_WINDOW = 11


# --------------------------------------------------------------------------------------------
# Clips in and out
# --------------------------------------------------------------------------------------------
def clip_tensor(frames: np.ndarray, spatial: int, temporal: int) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float ``(1, 3, T', H', W')`` in [-1, 1], encodable as it is.

    Keeps the first ``T' = k * temporal + 1`` frames and centre-crops H and W down to multiples
    of ``spatial``.
    """
    t, h, w, _ = frames.shape
    keep_t = (t - 1) // temporal * temporal + 1
    keep_h, keep_w = h // spatial * spatial, w // spatial * spatial
    if min(keep_h, keep_w) < spatial:
        raise ValueError(f"a {h}x{w} frame is smaller than the autoencoder's {spatial}px cell")
    top, left = (h - keep_h) // 2, (w - keep_w) // 2
    frames = frames[:keep_t, top : top + keep_h, left : left + keep_w]
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return x.permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float ``(C, T, H, W)`` in [-1, 1] -> uint8 frames ``(T, H, W, 3)``."""
    x = video.detach().float().cpu().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return x.to(torch.uint8).permute(1, 2, 3, 0).numpy()


def pad_to_encodable(
    video: torch.Tensor, spatial_factor: int, temporal_factor: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Replicate-pad ``(B, C, T, H, W)`` at the end of T, H and W to an encodable shape.

    Returns the padded video and the original ``(T, H, W)`` to crop back to.
    """
    _, _, t, h, w = video.shape
    pad_t = (-(t - 1)) % temporal_factor
    pad_h, pad_w = (-h) % spatial_factor, (-w) % spatial_factor
    if pad_t or pad_h or pad_w:
        # "replicate" pads the last three dimensions of a 5D tensor: (W, W, H, H, T, T).
        video = F.pad(video, (0, pad_w, 0, pad_h, 0, pad_t), mode="replicate")
    return video, (t, h, w)


# --------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def maybe_tiling(vae: torch.nn.Module, tile_size: int, height: int, width: int) -> Iterator[bool]:
    """Switch on the diffusers autoencoder's own spatial tiling when a frame exceeds ``tile_size``.

    Tiles of ``tile_size`` pixels overlap by a quarter (blended by diffusers). Yields whether
    tiling is on; restores the previous setting on exit.
    """
    if tile_size <= 0 or max(height, width) <= tile_size:
        yield False
        return
    inner = vae.vae
    factor = vae.spatial_factor
    tile = max(factor * 2, tile_size // factor * factor)
    stride = max(factor, (tile * 3 // 4) // factor * factor)
    keys = ("use_tiling", "tile_sample_min_height", "tile_sample_min_width")
    keys += ("tile_sample_stride_height", "tile_sample_stride_width")
    saved = {k: getattr(inner, k) for k in keys}
    inner.enable_tiling(
        tile_sample_min_height=tile,
        tile_sample_min_width=tile,
        tile_sample_stride_height=stride,
        tile_sample_stride_width=stride,
    )
    try:
        yield True
    finally:
        for key, value in saved.items():
            setattr(inner, key, value)


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, video: torch.Tensor, tile_size: int = 0) -> torch.Tensor:
    """Encode (posterior mean) and decode ``video`` ``(B, C, T, H, W)`` in [-1, 1]; same shape out.

    Any T, H, W: the clip is replicate-padded to an encodable shape and the output cropped back.
    Frames larger than ``tile_size`` (0 = never) go through the autoencoder's spatial tiling.
    """
    param = next(vae.parameters())
    padded, (t, h, w) = pad_to_encodable(video, vae.spatial_factor, vae.temporal_factor)
    padded = padded.to(device=param.device, dtype=param.dtype)
    with maybe_tiling(vae, tile_size, padded.shape[-2], padded.shape[-1]):
        recon = vae.decode_raw(vae.encode_raw(padded))
    return recon[:, :, :t, :h, :w].float().to(video.device)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def mse_per_clip(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per clip in float64: ``(B, C, T, H, W)`` twice -> ``(B,)``."""
    return (x.double() - y.double()).pow(2).flatten(1).mean(1)


def psnr_from_mse(mse: float, data_range: float = DATA_RANGE) -> float:
    """``10 log10(range^2 / mse)`` with the MSE floor of video_metrics (finite for identical clips)."""
    return 10.0 * math.log10(data_range**2 / max(mse, MSE_FLOOR))


def ssim_or_nan(x: torch.Tensor, y: torch.Tensor) -> float:
    """SSIM of one clip ``(1, C, T, H, W)``; NaN when a frame is smaller than the 11x11 window."""
    if min(x.shape[-2:]) < SSIM_WINDOW:
        return float("nan")
    return float(ssim(x, y, data_range=DATA_RANGE)[0])


@dataclass
class ReconstructionResult:
    """Per-clip errors of a set of reconstructions; :meth:`summary` is ``metrics/vae.json``."""

    mse: list[float] = field(default_factory=list)
    mse_baseline: list[float] = field(default_factory=list)
    num_values: list[int] = field(default_factory=list)
    """Elements (C * T * H * W) of each clip: the weights of the pooled MSE."""
    ssim: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)
    """Files written for inspection (the original | reconstruction mp4)."""

    def add(self, name: str, original: torch.Tensor, recon: torch.Tensor) -> None:
        """Score one clip ``(1, C, T, H, W)`` against its reconstruction."""
        self.names.append(name)
        self.mse.append(float(mse_per_clip(original, recon)[0]))
        self.mse_baseline.append(float(mse_per_clip(original, temporal_mean_baseline(original))[0]))
        self.num_values.append(original.numel())
        self.ssim.append(ssim_or_nan(original, recon))

    def summary(self) -> dict[str, float | int]:
        """``psnr`` and ``psnr_baseline`` of the pooled MSE, mean ``ssim``, ``num_clips``."""
        if not self.mse:
            raise ValueError("no clips were reconstructed")
        weights = np.asarray(self.num_values, dtype=np.float64)
        ssims = [s for s in self.ssim if not math.isnan(s)]
        return {
            "psnr": psnr_from_mse(float(np.average(self.mse, weights=weights))),
            "psnr_baseline": psnr_from_mse(float(np.average(self.mse_baseline, weights=weights))),
            "ssim": float(np.mean(ssims)) if ssims else float("nan"),
            "num_clips": len(self.mse),
        }

    def per_clip(self) -> list[dict[str, Any]]:
        """``name``, ``psnr``, ``psnr_baseline``, ``ssim`` of each clip."""
        return [
            {"name": n, "psnr": psnr_from_mse(m), "psnr_baseline": psnr_from_mse(b), "ssim": s}
            for n, m, b, s in zip(self.names, self.mse, self.mse_baseline, self.ssim)
        ]


def _is_video_row(row: dict[str, Any]) -> bool:
    from opensora_core.data.video_io import is_image_path

    return not is_image_path(str(row["path"])) and int(row.get("num_frames") or 0) > 1


def iter_clips(
    rows: Iterable[dict[str, Any]], spatial: int, temporal: int, max_clips: int = 0, root: str | Path = "."
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, clip (1, 3, T, H, W))`` of the video rows (stills skipped), read whole with PyAV.

    Paths are relative to ``root`` unless absolute; :func:`clip_tensor` makes them encodable.
    """
    from opensora_core.data.video_io import read_video

    count = 0
    for row in rows:
        if max_clips and count >= max_clips:
            return
        if not _is_video_row(row):
            continue
        path = Path(row["path"])
        frames, _ = read_video(path if path.is_absolute() else Path(root) / path)
        yield str(row["path"]), clip_tensor(frames, spatial, temporal)
        count += 1


def reconstruction_metrics(
    vae: torch.nn.Module,
    rows: Iterable[dict[str, Any]],
    max_clips: int = 0,
    out_dir: str | Path | None = None,
    *,
    root: str | Path = ".",
    keep: int = 4,
    fps: float = 8.0,
    progress: bool = False,
) -> ReconstructionResult:
    """Reconstruct up to ``max_clips`` (0 = all) video rows and score them.

    With ``out_dir``, writes ``reconstruction.mp4`` (the first ``keep`` clips, original left,
    reconstruction right, one after the other) and lists it in ``artifacts``.
    """
    result = ReconstructionResult()
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    clips = iter_clips(rows, vae.spatial_factor, vae.temporal_factor, max_clips, root)
    for name, clip in tqdm(clips, desc="reconstruct", unit="clip", disable=not progress):
        recon = reconstruct(vae, clip).cpu()
        result.add(name, clip, recon)
        if len(pairs) < keep:
            pairs.append((clip, recon))
    if out_dir is not None and pairs:
        result.artifacts.append(write_comparison_video(Path(out_dir) / "reconstruction.mp4", pairs, fps))
    return result


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
def comparison_frames(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], gap: int = 2) -> np.ndarray:
    """Each original beside its reconstruction, clip after clip: uint8 ``(sum T, H, 2 W + gap, 3)``.

    Pairs of ``(1, C, T, H, W)`` clips; each is drawn at the top left of a canvas as large as the
    largest clip (black elsewhere), with even sides for h264.
    """
    if not pairs:
        raise ValueError("no clips to show")
    width = max(o.shape[-1] for o, _ in pairs)
    height = max(o.shape[-2] for o, _ in pairs)
    height += height % 2
    canvas_w = 2 * width + gap + (2 * width + gap) % 2
    out = []
    for original, recon in pairs:
        a, b = to_uint8(original[0]), to_uint8(recon[0])
        t, h, w, _ = a.shape
        canvas = np.zeros((t, height, canvas_w, 3), dtype=np.uint8)
        canvas[:, :h, :w] = a
        canvas[:, :h, width + gap : width + gap + w] = b
        out.append(canvas)
    return np.concatenate(out)


def write_comparison_video(
    path: str | Path, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], fps: float = 8.0
) -> Path:
    """An mp4 of :func:`comparison_frames` (original left, reconstruction right)."""
    from opensora_core.data.video_io import write_video

    return write_video(path, comparison_frames(pairs), fps)


def reconstruction_grid(original: torch.Tensor, recon: torch.Tensor, max_clips: int = 2) -> np.ndarray:
    """Input frames over output frames: uint8 ``(2 n H, T W, 3)`` for ``n`` clips of a batch.

    ``original`` and ``recon`` are ``(B, C, T, H, W)`` in [-1, 1]; each clip gives two rows.
    """
    rows = []
    for i in range(min(max_clips, original.shape[0])):
        for video in (original[i], recon[i]):
            rows.append(np.concatenate(list(to_uint8(video)), axis=1))
    return np.concatenate(rows, axis=0)
