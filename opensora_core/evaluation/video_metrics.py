"""Reconstruction metrics for video batches ``(B, C, T, H, W)`` in ``[-1, 1]``: PSNR, SSIM, and the
temporal-mean baseline (each clip replaced by its per-pixel mean over time) that tells whether a
VAE reconstructs motion rather than a still average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Floor of the mean squared error: identical clips score a finite PSNR (~106 dB at range 2), so
# metrics stay valid JSON numbers.
MSE_FLOOR = 1e-10


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(
            f"expected two video batches (B, C, T, H, W) of one shape, got {x.shape} and {y.shape}"
        )


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per clip in dB: ``(B, C, T, H, W)`` twice -> ``(B,)``.

    ``10 log10(data_range^2 / mse)`` with the MSE over all of a clip's elements.
    """
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2D Gaussian ``(size, size)`` (float64)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per clip (Wang et al. 2004): ``(B, C, T, H, W)`` twice -> ``(B,)``.

    Each frame and channel is compared with an 11x11 Gaussian window (sigma 1.5) over the valid
    positions (no padding); the SSIM map is averaged over positions and channels per frame, then
    over frames.
    """
    _check_pair(x, y)
    b, c, t, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"frames of {h}x{w} are smaller than the {window_size}x{window_size} SSIM window")
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    frames_x = x.double().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    frames_y = y.double().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    window = gaussian_window(window_size, sigma).to(x.device).expand(c, 1, window_size, window_size)

    def blur(img: torch.Tensor) -> torch.Tensor:
        return F.conv2d(img, window, groups=c)

    mu_x, mu_y = blur(frames_x), blur(frames_y)
    var_x = blur(frames_x * frames_x) - mu_x * mu_x
    var_y = blur(frames_y * frames_y) - mu_y * mu_y
    cov = blur(frames_x * frames_y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    per_frame = ssim_map.flatten(1).mean(1).view(b, t)
    return per_frame.mean(1).float()


def temporal_mean_baseline(x: torch.Tensor) -> torch.Tensor:
    """Each clip replaced by its per-pixel mean over time: ``(B, C, T, H, W)`` -> same shape."""
    if x.ndim != 5:
        raise ValueError(f"expected a video batch (B, C, T, H, W), got shape {tuple(x.shape)}")
    return x.mean(dim=2, keepdim=True).expand_as(x).clone()
