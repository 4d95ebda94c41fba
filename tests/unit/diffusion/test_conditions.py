"""Condition masks for every type, availability by clip length, weighted drawing."""

from __future__ import annotations

import pytest
import torch

from opensora_core.diffusion.conditions import (
    CONDITION_TYPES,
    ConditionConfig,
    available_weights,
    build_condition,
    build_conditions,
    get_condition_frames,
    is_available,
    sample_condition_types,
)
from opensora_core.diffusion.rectified_flow import flow_loss
from opensora_core.errors import ConfigError

# Conditioned latent frames of a 5-frame clip (v2v default: half, rounded down = 2).
EXPECTED_T5 = {
    "t2v": [0, 0, 0, 0, 0],
    "i2v_head": [1, 0, 0, 0, 0],
    "i2v_tail": [0, 0, 0, 0, 1],
    "i2v_loop": [1, 0, 0, 0, 1],
    "v2v_head": [1, 1, 0, 0, 0],
    "v2v_tail": [0, 0, 0, 1, 1],
}


def _latents(*shape: int) -> torch.Tensor:
    # Strictly positive values, so a zero in masked_ref can only come from the mask.
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)) + 0.5


@pytest.mark.parametrize("cond_type", CONDITION_TYPES)
def test_masks_for_every_type(cond_type: str) -> None:
    latents = _latents(4, 5, 3, 2)
    mask, masked_ref, loss_mask = build_condition(cond_type, latents)
    expected = torch.tensor(EXPECTED_T5[cond_type], dtype=torch.float32)
    assert mask.shape == (1, 5, 3, 2) and masked_ref.shape == (4, 5, 3, 2) and loss_mask.shape == (5,)
    assert mask.dtype == latents.dtype
    assert torch.equal(mask[0, :, 0, 0], expected) and torch.equal(mask, mask[:, :, :1, :1].expand_as(mask))
    assert torch.equal(loss_mask, 1 - expected)
    cond = expected.bool()
    assert torch.equal(masked_ref[:, cond], latents[:, cond])
    assert torch.all(masked_ref[:, ~cond] == 0)


def test_v2v_frame_count_is_configurable() -> None:
    assert get_condition_frames("v2v_head", 5, v2v_frames=3) == [0, 1, 2]
    assert get_condition_frames("v2v_tail", 5, v2v_frames=3) == [2, 3, 4]
    assert get_condition_frames("v2v_head", 8) == [0, 1, 2, 3]
    assert get_condition_frames("v2v_tail", 7) == [4, 5, 6]  # 7 // 2 = 3
    _, _, loss_mask = build_condition("v2v_head", _latents(2, 5, 2, 2), v2v_frames=3)
    assert loss_mask.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="unknown condition type"):
        get_condition_frames("i2v_middle", 5)


def test_batched_conditions_match_single_ones() -> None:
    latents = _latents(3, 4, 5, 2, 2)
    types = ["t2v", "i2v_loop", "v2v_tail"]
    mask, masked_ref, loss_mask = build_conditions(types, latents)
    assert mask.shape == (3, 1, 5, 2, 2) and masked_ref.shape == latents.shape and loss_mask.shape == (3, 5)
    for i, k in enumerate(types):
        single = build_condition(k, latents[i])
        assert torch.equal(mask[i], single.mask) and torch.equal(masked_ref[i], single.masked_ref)
        assert torch.equal(loss_mask[i], single.loss_mask)
    same = build_condition("i2v_head", latents)
    assert same.mask.shape == (3, 1, 5, 2, 2) and same.loss_mask[:, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        build_conditions(["t2v"], latents)


def test_loss_mask_from_conditions_keeps_given_frames_out_of_the_loss() -> None:
    latents = _latents(2, 4, 5, 2, 2)
    _, _, loss_mask = build_conditions(["i2v_head", "v2v_tail"], latents)
    target = torch.zeros_like(latents)
    pred = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    base = flow_loss(pred, target, loss_mask)
    pred[0, :, 0] = 1e3  # i2v_head: frame 0 given
    pred[1, :, 3:] = -1e3  # v2v_tail: frames 3, 4 given
    assert torch.equal(flow_loss(pred, target, loss_mask), base)


# --------------------------------------------------------------------------------------------
# Availability by clip length
# --------------------------------------------------------------------------------------------
def test_availability_by_length() -> None:
    # Stills: only t2v.
    assert [k for k in CONDITION_TYPES if is_available(k, 1)] == ["t2v"]
    # Two frames: loop would give both frames; v2v half is one frame.
    assert [k for k in CONDITION_TYPES if is_available(k, 2)] == [
        "t2v",
        "i2v_head",
        "i2v_tail",
        "v2v_head",
        "v2v_tail",
    ]
    assert all(is_available(k, 3) for k in CONDITION_TYPES)
    # A fixed v2v count that covers the whole clip leaves nothing to generate.
    assert not is_available("v2v_head", 3, v2v_frames=3) and not is_available("v2v_tail", 3, v2v_frames=4)
    assert is_available("v2v_head", 4, v2v_frames=3)


def test_weights_renormalise_among_available_types() -> None:
    weights = {"t2v": 1.0, "i2v_head": 1.0, "i2v_loop": 0.0, "v2v_head": 2.0}
    assert available_weights(weights, 5) == pytest.approx({"t2v": 0.25, "i2v_head": 0.25, "v2v_head": 0.5})
    assert available_weights(weights, 5, v2v_frames=5) == pytest.approx({"t2v": 0.5, "i2v_head": 0.5})
    assert available_weights(weights, 1) == {"t2v": 1.0}
    # Nothing with weight left: fall back to text only.
    assert available_weights({"v2v_tail": 1.0}, 1) == {"t2v": 1.0}


def test_drawn_types_follow_the_weights_and_are_deterministic() -> None:
    weights = {"t2v": 1.0, "i2v_head": 3.0}
    drawn = sample_condition_types(20_000, weights, 5, generator=torch.Generator().manual_seed(0))
    share = drawn.count("i2v_head") / len(drawn)
    assert set(drawn) == {"t2v", "i2v_head"}
    assert share == pytest.approx(0.75, abs=0.015)  # 5 standard errors (0.0031)
    again = sample_condition_types(20_000, weights, 5, generator=torch.Generator().manual_seed(0))
    other = sample_condition_types(20_000, weights, 5, generator=torch.Generator().manual_seed(1))
    assert again == drawn and other != drawn


def test_short_clips_never_draw_v2v_and_stills_are_t2v() -> None:
    weights = {k: 1.0 for k in CONDITION_TYPES}
    g = torch.Generator().manual_seed(0)
    assert set(sample_condition_types(500, weights, 1, generator=g)) == {"t2v"}
    drawn = sample_condition_types(2_000, weights, 3, v2v_frames=3, generator=g)
    assert set(drawn) == {"t2v", "i2v_head", "i2v_tail", "i2v_loop"}
    assert set(sample_condition_types(2_000, weights, 5, generator=g)) == set(CONDITION_TYPES)


def test_condition_config_checks() -> None:
    assert ConditionConfig().weights == {"t2v": 1.0}
    with pytest.raises(ConfigError, match="unknown condition type 'i2v'"):
        ConditionConfig(weights={"i2v": 1.0})
    with pytest.raises(ConfigError, match=">= 0"):
        ConditionConfig(weights={"t2v": -1.0})
    with pytest.raises(ConfigError, match="> 0"):
        ConditionConfig(weights={"t2v": 0.0})
    with pytest.raises(ConfigError):
        ConditionConfig(v2v_frames=-1)
