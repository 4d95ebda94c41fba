"""PSNR, SSIM and the temporal-mean baseline against values computed by hand with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opensora_core.evaluation.video_metrics import psnr, ssim, temporal_mean_baseline


def numpy_ssim_clip(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
    """SSIM of one clip (C, T, H, W), written out position by position."""
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    channels, frames, height, width = x.shape
    per_frame = []
    for t in range(frames):
        values = []
        for c in range(channels):
            for i in range(height - 10):
                for j in range(width - 10):
                    px, py = x[c, t, i : i + 11, j : j + 11], y[c, t, i : i + 11, j : j + 11]
                    mx, my = (window * px).sum(), (window * py).sum()
                    vx = (window * (px - mx) ** 2).sum()
                    vy = (window * (py - my) ** 2).sum()
                    cov = (window * (px - mx) * (py - my)).sum()
                    values.append(
                        ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
                    )
        per_frame.append(np.mean(values))
    return float(np.mean(per_frame))


def random_clips(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_matches_numpy():
    x, y = random_clips((3, 3, 2, 8, 8), 0), random_clips((3, 3, 2, 8, 8), 1)
    mse = ((x.numpy().astype(np.float64) - y.numpy()) ** 2).reshape(3, -1).mean(1)
    expected = 10 * np.log10(4.0 / mse)
    np.testing.assert_allclose(psnr(x, y).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(psnr(x, y, data_range=1.0).numpy(), 10 * np.log10(1.0 / mse), rtol=1e-5)


def test_psnr_of_a_constant_offset():
    x = random_clips((2, 3, 5, 16, 16))
    # mse = 0.01 -> 10 log10(4 / 0.01) = 26.0206 dB
    np.testing.assert_allclose(psnr(x, x + 0.1).numpy(), [10 * math.log10(400)] * 2, rtol=1e-4)
    assert torch.isfinite(psnr(x, x)).all() and (psnr(x, x) > 100).all()


def test_ssim_matches_numpy():
    x = random_clips((2, 3, 2, 14, 13), 0)
    y = (x + 0.3 * random_clips((2, 3, 2, 14, 13), 1)).clamp(-1, 1)
    expected = [numpy_ssim_clip(x[b].double().numpy(), y[b].double().numpy()) for b in range(2)]
    np.testing.assert_allclose(ssim(x, y).numpy(), expected, rtol=1e-5)


def test_ssim_of_identical_clips_is_one_and_lower_for_noise():
    x = random_clips((2, 3, 3, 16, 16))
    np.testing.assert_allclose(ssim(x, x).numpy(), [1.0, 1.0], rtol=0, atol=1e-6)
    noisy = (x + 0.5 * random_clips((2, 3, 3, 16, 16), 5)).clamp(-1, 1)
    assert (ssim(x, noisy) < 0.9).all()


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 2, 8, 9))
    with pytest.raises(ValueError, match="window"):
        ssim(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 2, 8, 8))


def test_temporal_mean_baseline():
    x = random_clips((2, 3, 5, 16, 16))
    baseline = temporal_mean_baseline(x)
    assert baseline.shape == x.shape
    expected = x.numpy().mean(axis=2, keepdims=True)
    for t in range(5):
        np.testing.assert_allclose(baseline[:, :, t].numpy(), expected[:, :, 0], rtol=1e-6, atol=1e-6)
    still = x[:, :, :1].repeat(1, 1, 5, 1, 1)
    torch.testing.assert_close(temporal_mean_baseline(still), still)
    # Random frames vary in time, so the baseline loses to a near-perfect reconstruction.
    assert (psnr(x, baseline) < psnr(x, x + 0.01)).all()
