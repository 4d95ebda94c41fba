"""Rectified flow: shift and schedule against hand-computed numbers, sampling, interpolation, loss."""

from __future__ import annotations

import math

import pytest
import torch

from opensora_core.diffusion.rectified_flow import (
    RectifiedFlow,
    RectifiedFlowConfig,
    compute_shift,
    flow_loss,
    get_schedule,
    interpolate,
    loss_by_bin,
    sample_timesteps,
    time_shift,
    timestep_bins,
    velocity_target,
)
from opensora_core.errors import ConfigError


# --------------------------------------------------------------------------------------------
# Shift and schedule
# --------------------------------------------------------------------------------------------
def test_compute_shift_worked_numbers() -> None:
    # s = scale * sqrt(tokens / base_tokens) * sqrt(frames / base_frames)
    assert compute_shift(256, 1) == pytest.approx(1.0)
    assert compute_shift(1024, 1) == pytest.approx(2.0)  # sqrt(1024 / 256) = 2
    assert compute_shift(1024, 4) == pytest.approx(4.0)  # 2 * sqrt(4)
    assert compute_shift(64, 1) == pytest.approx(0.5)  # smaller than the base: towards data
    assert compute_shift(16, 9, base_tokens=16, base_frames=1, scale=2.0) == pytest.approx(6.0)  # 2 * 1 * 3
    with pytest.raises(ValueError):
        compute_shift(0, 1)


def test_time_shift_worked_numbers() -> None:
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    # s = 4: 4t / (1 + 3t) -> 0, 1/1.75, 2/2.5, 3/3.25, 1
    expected = torch.tensor([0.0, 1 / 1.75, 0.8, 3 / 3.25, 1.0], dtype=torch.float64)
    assert torch.allclose(time_shift(t, 4.0), expected)
    assert torch.allclose(time_shift(t, 1.0), t)
    # s = 1/2 is the inverse of s = 2.
    assert torch.allclose(time_shift(time_shift(t, 2.0), 0.5), t)
    # Per-sample shifts broadcast.
    assert torch.allclose(
        time_shift(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 3.0])), torch.tensor([0.5, 0.75])
    )


def test_get_schedule_worked_numbers() -> None:
    ts = get_schedule(4, num_tokens=1024, num_frames=4)  # s = 4
    assert ts.shape == (5,) and ts.dtype == torch.float32
    assert torch.allclose(ts, torch.tensor([1.0, 3 / 3.25, 0.8, 1 / 1.75, 0.0]), atol=1e-7)
    assert torch.all(ts[1:] < ts[:-1])
    assert torch.allclose(get_schedule(4, 1024, 4, shift=False), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # More tokens or frames: more of the steps are spent near the noise end.
    assert get_schedule(4, 4096, 4)[2] > ts[2] > get_schedule(4, 1024, 1)[2]
    with pytest.raises(ValueError):
        get_schedule(0, 256, 1)


# --------------------------------------------------------------------------------------------
# Timestep sampling
# --------------------------------------------------------------------------------------------
def test_logit_normal_samples_range_median_and_spread() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(100_000, generator=g)
    assert t.shape == (100_000,) and t.dtype == torch.float32
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    assert torch.logit(t.double()).std().item() == pytest.approx(1.0, abs=0.02)

    t = sample_timesteps(100_000, logit_mean=1.0, logit_std=0.5, generator=g)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)  # sigmoid(1) = 0.7311
    assert torch.logit(t.double()).std().item() == pytest.approx(0.5, abs=0.01)

    # The shift is monotone, so it moves the median to s / (1 + s) = 0.8 for s = 4.
    t = sample_timesteps(100_000, shift=4.0, generator=g)
    assert t.median().item() == pytest.approx(0.8, abs=0.01)
    assert t.min() > 0 and t.max() < 1


def test_timestep_sampling_is_deterministic() -> None:
    a = sample_timesteps(16, generator=torch.Generator().manual_seed(5))
    b = sample_timesteps(16, generator=torch.Generator().manual_seed(5))
    c = sample_timesteps(16, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# Interpolation and target
# --------------------------------------------------------------------------------------------
def _pair(shape=(3, 4, 2, 5, 5), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(
        shape, generator=g, dtype=torch.float64
    )


def test_interpolation_endpoints_and_midpoint() -> None:
    x0, noise = _pair()
    zeros, ones = torch.zeros(3), torch.ones(3)
    assert torch.equal(interpolate(x0, noise, zeros), x0)
    assert torch.equal(interpolate(x0, noise, ones), noise)
    assert torch.allclose(interpolate(x0, noise, torch.full((3,), 0.5)), (x0 + noise) / 2)
    sm = 1e-5
    assert torch.allclose(interpolate(x0, noise, zeros, sm), x0)
    assert torch.allclose(interpolate(x0, noise, ones, sm), sm * x0 + noise)
    # Each sample uses its own t.
    xt = interpolate(x0, noise, torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])


def test_velocity_target_is_the_time_derivative() -> None:
    x0, noise = _pair()
    sm, h = 1e-3, 1e-4
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    numeric = (interpolate(x0, noise, t + h, sm) - interpolate(x0, noise, t - h, sm)) / (2 * h)
    assert torch.allclose(numeric, velocity_target(x0, noise, sm), atol=1e-8)
    assert torch.equal(velocity_target(x0, noise), noise - x0)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def test_flow_loss_without_mask_is_per_sample_mse() -> None:
    pred, target = _pair()
    loss = flow_loss(pred, target)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    expected = (pred - target).square().flatten(1).mean(1)
    assert torch.allclose(loss.double(), expected, atol=1e-6)


def test_masked_loss_ignores_conditioned_frames() -> None:
    pred, target = _pair(shape=(2, 4, 3, 5, 5))
    loss_mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    base = flow_loss(pred, target, loss_mask)

    changed = pred.clone()
    changed[0, :, 0] += 100.0  # sample 0, frame 0 is conditioned
    changed[1, :, 2] -= 50.0  # sample 1, frame 2 is conditioned
    assert torch.equal(flow_loss(changed, target, loss_mask), base)

    changed[0, :, 1] += 1.0  # an unmasked frame does count
    after = flow_loss(changed, target, loss_mask)
    assert after[0] > base[0] and after[1] == base[1]


def test_masked_loss_normalises_by_unmasked_elements() -> None:
    target = torch.zeros(2, 4, 3, 2, 2)
    pred = torch.ones(2, 4, 3, 2, 2)
    pred[:, :, 0] = 7.0  # large error on the conditioned frame only
    loss_mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    loss = flow_loss(pred, target, loss_mask)
    # Sample 0: squared error 1 on every counted element -> mean 1. Sample 1: nothing counted -> 0.
    assert loss.tolist() == [1.0, 0.0]
    # A full-shape mask gives the same as the (B, T) frame mask.
    full = loss_mask[:, None, :, None, None].expand(2, 4, 3, 2, 2)
    assert torch.equal(flow_loss(pred, target, full), loss)
    with pytest.raises(ValueError):
        flow_loss(pred, target[:1])


def test_timestep_bins_and_loss_by_bin() -> None:
    t = torch.tensor([0.0, 0.099, 0.1, 0.5, 0.999, 1.0])
    assert timestep_bins(t, 10).tolist() == [0, 0, 1, 5, 9, 9]
    assert timestep_bins(t, 2).tolist() == [0, 0, 0, 1, 1, 1]
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    sums, counts = loss_by_bin(loss, t, 2)
    assert sums.tolist() == [6.0, 15.0] and counts.tolist() == [3, 3]
    with pytest.raises(ValueError):
        timestep_bins(t, 0)


# --------------------------------------------------------------------------------------------
# The bound class and its options
# --------------------------------------------------------------------------------------------
def test_rectified_flow_uses_its_config() -> None:
    rf = RectifiedFlow(RectifiedFlowConfig(base_tokens=16, base_frames=1, shift_scale=1.0, sigma_min=0.0))
    assert rf.shift(64, 4) == pytest.approx(4.0)  # sqrt(64 / 16) * sqrt(4)
    assert torch.allclose(rf.schedule(4, 64, 4), get_schedule(4, 1024, 4))
    t = rf.sample_t(50_000, 64, 4, generator=torch.Generator().manual_seed(0))
    assert t.median().item() == pytest.approx(0.8, abs=0.01)

    x0, noise = _pair()
    xt, target = rf.prepare_inputs(x0, noise, torch.ones(3))
    assert torch.equal(xt, noise) and torch.equal(target, noise - x0)
    assert torch.equal(rf.loss(target, target), torch.zeros(3))

    off = RectifiedFlow(RectifiedFlowConfig(use_shift=False))
    assert off.shift(4096, 16) == 1.0
    assert torch.allclose(off.schedule(2, 4096, 16), torch.tensor([1.0, 0.5, 0.0]))


@pytest.mark.parametrize(
    "kwargs",
    [{"logit_std": 0.0}, {"sigma_min": 1.0}, {"shift_scale": 0.0}, {"base_tokens": 0}, {"base_frames": 0}],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        RectifiedFlowConfig(**kwargs)
