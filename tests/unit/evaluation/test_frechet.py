"""fvd_vae: the Fréchet distance against closed forms and scipy, and the metric on a real tiny VAE
(samples equal to the real clips score 0, noise scores far above other real clips)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from opensora_core.config import IngestConfig
from opensora_core.data import synthetic
from opensora_core.evaluation.frechet import (
    common_frames,
    frechet_distance,
    fvd_vae,
    latent_features,
)
from opensora_core.models.vae.model import VaeModelConfig, build_vae


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root, as an independent reference."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def test_identical_sets_are_at_zero_and_a_shift_costs_its_squared_length() -> None:
    a = np.random.default_rng(0).normal(size=(50, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 3.0])
    # same covariance: only the means differ, by |shift|^2 = 14.25
    assert frechet_distance(a, a + shift) == pytest.approx(14.25, rel=1e-9)


def test_matches_scipy_and_is_symmetric() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(30, 5)) * 2.0 + 1.0
    d = frechet_distance(a, b)
    assert d == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    assert d == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert d > 0


def test_singular_covariances_from_few_clips_stay_finite() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 24)), rng.normal(size=(4, 24)) + 5.0  # rank 2 and 3 in 24 dims
    d = frechet_distance(a, b)
    assert math.isfinite(d) and d > 24 * 25 * 0.5  # the means alone are ~ 24 * 25 apart


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 2 rows"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_features_are_mean_std_and_motion_per_channel() -> None:
    z = torch.zeros(2, 3, 4, 2, 2)
    z[0, 1] = 2.0  # constant channel: mean 2, std 0, no motion
    z[1, 0, 1::2] = 1.0  # alternating frames: mean 0.5, std 0.5, motion 1
    f = latent_features(z)
    assert f.shape == (2, 9)
    np.testing.assert_allclose(f[0], [0, 2, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(f[1], [0.5, 0, 0, 0.5, 0, 0, 1, 0, 0])
    assert latent_features(torch.ones(1, 2, 1, 3, 3))[0, 4:].tolist() == [0.0, 0.0]


def test_common_frames_is_the_largest_encodable_length() -> None:
    assert common_frames([17, 9, 12], 4) == 9
    assert common_frames([17, 16], 4) == 13
    assert common_frames([3, 17], 4) == 1


def moving_shapes(seed: int, count: int) -> list[np.ndarray]:
    cfg = IngestConfig(num_clips=count, num_stills=0, val_combos=1, num_frames=[9], seed=seed)
    return [synthetic.render(s) for s in synthetic.plan_samples(cfg)][:count]


def test_fvd_vae_is_zero_for_the_real_clips_and_large_for_noise() -> None:
    torch.manual_seed(0)
    vae = build_vae(VaeModelConfig()).eval()
    real = moving_shapes(seed=0, count=6)
    same, note = fvd_vae(vae, real, real)
    assert same == pytest.approx(0.0, abs=1e-6) and "6 samples vs 6 held-out clips" in note

    other_real, _ = fvd_vae(vae, moving_shapes(seed=1, count=6), real)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, size=r.shape, dtype=np.uint8) for r in real]
    noisy, _ = fvd_vae(vae, noise, real)
    assert other_real > 0 and noisy > 10 * other_real

    # longer real clips are cut to the samples' length; too few clips give no value and a reason
    longer = [np.concatenate([r, r[:8]]) for r in real]
    assert fvd_vae(vae, real, longer)[0] == pytest.approx(0.0, abs=1e-6)
    value, reason = fvd_vae(vae, real[:1], real)
    assert value is None and "needs >= 2" in reason
