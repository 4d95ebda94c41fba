"""``fvd_vae``: the Fréchet distance between samples and real held-out clips in the VAE's latent space.

A label-free measure of how close generated videos come to the data, for any dataset:

1. both sets are brought to one shape: the samples' height and width (real clips resized and
   centre-cropped as the training data is, :func:`~opensora_core.data.dataset.prepare_video`) and
   their first ``F`` frames, ``F`` the largest ``k * temporal_factor + 1`` that neither the samples
   nor the shortest real clip fall short of (stills are left out);
2. the project's own VAE encodes each clip (posterior mean, normalised latents
   ``(C, T', H', W')``), and the clip's feature is, per latent channel, the mean and the standard
   deviation over space and time and the mean absolute difference between consecutive latent
   frames (motion): ``3 C`` numbers;
3. a Gaussian is fitted to each set's features and the Fréchet distance between the two is
   ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``.

Lower is better; 0 means the two sets' feature statistics are the same. This is *not* the FVD
of the literature (I3D features of a Kinetics-trained network, thousands of clips): the features
come from this project's VAE, so values depend on that VAE and are comparable only between
models evaluated with the same VAE on the same held-out clips and number of samples, never with
published figures. With few clips the covariances are rank-deficient and the estimate is biased
upwards; it still orders models evaluated alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIN_CLIPS = 2
"""Fewest clips per set: a covariance needs two."""


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` ``(N, D)`` and ``b`` ``(M, D)``.

    The matrix square root goes through symmetric eigendecompositions (``S_a^1/2`` first, then the
    eigenvalues of the symmetric ``S_a^1/2 S_b S_a^1/2``), which stays real and stable when the
    covariances are singular. ValueError for fewer than :data:`MIN_CLIPS` rows or mismatched D.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {a.shape} and {b.shape}")
    if len(a) < MIN_CLIPS or len(b) < MIN_CLIPS:
        raise ValueError(f"each set needs >= {MIN_CLIPS} rows, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    sqrt_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(_symmetric(sqrt_a @ cov_b @ sqrt_a))
    trace_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(distance, 0.0)  # rounding can leave -1e-15 for identical sets


def latent_features(latents: Any) -> np.ndarray:
    """Per-clip features of latents ``(B, C, T', H', W')``: ``(B, 3 C)`` float64, per channel the
    mean and std over (T', H', W') and the mean absolute difference of consecutive latent frames
    (zero when T' = 1)."""
    z = latents.double()
    flat = z.flatten(2)
    mean, std = flat.mean(dim=2), flat.std(dim=2, unbiased=False)
    if z.shape[2] > 1:
        motion = (z[:, :, 1:] - z[:, :, :-1]).abs().flatten(2).mean(dim=2)
    else:
        motion = mean.new_zeros(mean.shape)
    return np.concatenate([mean.cpu().numpy(), std.cpu().numpy(), motion.cpu().numpy()], axis=1)


def common_frames(lengths: Sequence[int], temporal_factor: int) -> int:
    """The largest ``k * temporal_factor + 1`` not above any of ``lengths`` (>= 1)."""
    shortest = max(1, min(lengths))
    return (shortest - 1) // temporal_factor * temporal_factor + 1


def encode_features(
    vae: Any, clips: Sequence[np.ndarray], height: int, width: int, frames: int
) -> np.ndarray:
    """:func:`latent_features` of uint8 clips ``(T, H0, W0, 3)``, each cut to its first ``frames``
    frames and resized and centre-cropped to ``height x width``, encoded one at a time: ``(N, 3 C)``."""
    import torch

    from opensora_core.data.dataset import prepare_video

    param = next(vae.parameters())
    out = []
    with torch.no_grad():
        for clip in clips:
            x = prepare_video(np.asarray(clip[:frames]), height, width).unsqueeze(0)
            z = vae.encode(x.to(device=param.device, dtype=param.dtype))
            out.append(latent_features(z))
    return np.concatenate(out, axis=0)


def read_real_clips(rows: Any, root: Path) -> list[np.ndarray]:
    """The video rows' frames ``(T, H, W, 3)`` uint8, read whole (stills and unreadable files left out)."""
    from opensora_core.data.video_io import is_image_path, read_video

    clips = []
    for path in rows["path"]:
        if is_image_path(str(path)):
            continue
        full = Path(str(path)) if Path(str(path)).is_absolute() else Path(root) / str(path)
        try:
            frames, _ = read_video(full)
        except Exception:  # validate passed it; a file replaced since is left out, not fatal
            continue
        if len(frames):
            clips.append(frames)
    return clips


def fvd_vae(vae: Any, samples: Sequence[np.ndarray], real: Sequence[np.ndarray]) -> tuple[float | None, str]:
    """``(distance, note)`` between ``samples`` and ``real`` clips (uint8 ``(T, H, W, 3)`` each) as the
    module docstring defines it, at the samples' size. The distance is None, with the reason as
    the note, when a set has fewer than :data:`MIN_CLIPS` videos."""
    videos = [s for s in samples if len(s) > 1]
    if len(videos) < MIN_CLIPS or len(real) < MIN_CLIPS:
        return None, (
            f"fvd_vae needs >= {MIN_CLIPS} video samples and held-out video clips, "
            f"got {len(videos)} and {len(real)}"
        )
    height, width = videos[0].shape[1:3]
    frames = common_frames([len(v) for v in (*videos, *real)], vae.temporal_factor)
    a = encode_features(vae, videos, height, width, frames)
    b = encode_features(vae, real, height, width, frames)
    note = f"{len(videos)} samples vs {len(real)} held-out clips at {frames}x{height}x{width}"
    return frechet_distance(a, b), note


def _symmetric(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2.0


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    values, vectors = np.linalg.eigh(_symmetric(m))
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
