"""Euler sampler: determinism, the guidance combination, batch independence, held reference frames."""

from __future__ import annotations

import pytest
import torch

from opensora_core.diffusion.conditions import CONDITION_TYPES, build_conditions
from opensora_core.diffusion.denoiser import predict_velocity
from opensora_core.diffusion.rectified_flow import RectifiedFlowConfig, compute_shift, get_schedule
from opensora_core.diffusion.sampling import (
    SamplingOptions,
    guided_velocity,
    prepare_noise,
    sample,
    sample_euler,
    sampling_schedule,
)
from opensora_core.errors import ConfigError
from opensora_core.models.mmdit.model import build_mmdit
from opensora_core.models.text.encoders import TextEmbeddings

SHAPE = (8, 3, 4, 4)  # latent (C, T, H, W)
FLOW = RectifiedFlowConfig()


def random_model(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = build_mmdit("tiny").eval()
    # Random weights everywhere: the default init zeroes the output layer and cond_in.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def embeddings(b: int, seed: int) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    return TextEmbeddings(
        tokens=torch.randn(b, 5, 384, generator=g),
        mask=torch.ones(b, 5, dtype=torch.bool),
        pooled=torch.randn(b, 384, generator=g),
    )


@pytest.fixture(scope="module")
def model():
    return random_model()


def test_same_inputs_give_identical_latents(model) -> None:
    noise = prepare_noise([3, 4], SHAPE)
    text, null = embeddings(2, 1), embeddings(1, 2)
    opts = SamplingOptions(num_steps=4, guidance=4.0)
    a = sample_euler(model, noise, text, null, opts, FLOW)
    b = sample_euler(model, noise.clone(), text, null, opts, FLOW)
    assert a.shape == noise.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, noise)  # the model moved the latents


def test_noise_of_a_seed_is_the_same_alone_or_batched() -> None:
    batched = prepare_noise([10, 11, 12], SHAPE)
    alone = prepare_noise([11], SHAPE)
    assert torch.equal(batched[1], alone[0])
    assert not torch.equal(batched[0], batched[1])


def test_a_sample_alone_matches_the_same_sample_in_a_batch(model) -> None:
    noise = prepare_noise([5, 6], SHAPE)
    text = embeddings(2, 1)
    null = embeddings(1, 2)
    opts = SamplingOptions(num_steps=3, guidance=3.0)
    both = sample_euler(model, noise, text, null, opts, FLOW)
    alone = sample_euler(model, noise[1:], text.select(slice(1, 2)), null, opts, FLOW)
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-4)


def test_zero_velocity_model_returns_the_noise() -> None:
    model = build_mmdit("tiny")  # default init: zero output layer, so v = 0 everywhere
    noise = prepare_noise([0], SHAPE)
    out = sample_euler(model, noise, embeddings(1, 0), embeddings(1, 1), SamplingOptions(num_steps=3), FLOW)
    assert torch.equal(out, noise)


def test_euler_steps_follow_the_shifted_schedule(model) -> None:
    noise = prepare_noise([7], SHAPE)
    text, null = embeddings(1, 1), embeddings(1, 2)
    opts = SamplingOptions(num_steps=3, guidance=1.0)
    ts = sampling_schedule(opts, FLOW, tuple(noise.shape), patch_size=2)
    # 4x4 latents in 2x2 patches: 4 tokens per frame, 3 frames.
    s = compute_shift(4, 3, base_tokens=FLOW.base_tokens, base_frames=FLOW.base_frames)
    torch.testing.assert_close(ts, get_schedule(3, 4, 3, shift=True))
    assert abs(float(ts[2]) - s * (1 / 3) / (1 + (s - 1) * (1 / 3))) < 1e-6
    # guidance 1 without a reference is one conditional pass per step: a plain Euler loop.
    x = noise.clone()
    for t0, t1 in zip(ts[:-1].tolist(), ts[1:].tolist()):
        x = x + (t1 - t0) * predict_velocity(model, x, torch.tensor([t0]), text)
    torch.testing.assert_close(sample_euler(model, noise, text, null, opts, FLOW), x, rtol=1e-5, atol=1e-5)
    unshifted = SamplingOptions(num_steps=3, use_shift=False)
    assert torch.allclose(
        sampling_schedule(unshifted, FLOW, tuple(noise.shape), 2), torch.tensor([1, 2 / 3, 1 / 3, 0])
    )


def test_text_and_image_guidance_combine_three_passes(model) -> None:
    x = prepare_noise([1, 2], SHAPE)
    text, null = embeddings(2, 1), embeddings(1, 2)
    cond = build_conditions(["i2v_head", "v2v_tail"], torch.randn(2, *SHAPE))
    t, g, gi = 0.6, 5.0, 2.0
    tt = torch.full((2,), t)
    null2 = TextEmbeddings.cat([null, null])
    v_c = predict_velocity(model, x, tt, text, cond.mask, cond.masked_ref)
    v_u = predict_velocity(model, x, tt, null2, cond.mask, cond.masked_ref)
    v_uu = predict_velocity(model, x, tt, null2)
    expected = v_uu + gi * (v_u - v_uu) + g * (v_c - v_u)
    got = guided_velocity(model, x, t, text, null, g, gi, cond.mask, cond.masked_ref)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Without a reference: classifier-free guidance over the text alone.
    cfg = v_uu + g * (predict_velocity(model, x, tt, text) - v_uu)
    torch.testing.assert_close(guided_velocity(model, x, t, text, null, g, gi), cfg, rtol=1e-4, atol=1e-4)


def test_negative_prompt_replaces_the_empty_prompt(model) -> None:
    noise = prepare_noise([9], SHAPE)
    text = embeddings(1, 1)
    opts = SamplingOptions(num_steps=2, guidance=4.0)
    empty = sample_euler(model, noise, text, embeddings(1, 2), opts, FLOW)
    negative = sample_euler(model, noise, text, embeddings(1, 3), opts, FLOW)
    assert not torch.allclose(empty, negative)


@pytest.mark.parametrize("cond_type", CONDITION_TYPES)
def test_each_condition_type_keeps_its_reference_frames(model, cond_type: str) -> None:
    ref = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(4))
    cond = build_conditions([cond_type], ref)
    noise = prepare_noise([2], SHAPE)
    opts = SamplingOptions(num_steps=3, guidance=2.0, guidance_img=1.5)
    out = sample(model, noise, embeddings(1, 1), embeddings(1, 2), opts, FLOW, cond.mask, cond.masked_ref)
    given = cond.mask[0, 0, :, 0, 0].bool()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0][:, given], ref[0][:, given])
    assert not torch.allclose(out[0][:, ~given], ref[0][:, ~given])


def test_options_reject_bad_values() -> None:
    with pytest.raises(ConfigError, match="num_steps"):
        SamplingOptions(num_steps=0)
    with pytest.raises(ConfigError, match="unknown sampler"):
        SamplingOptions(sampler="heun")


def test_oscillating_guidance_changes_the_result(model) -> None:
    noise = prepare_noise([1], SHAPE)
    text, null = embeddings(1, 1), embeddings(1, 2)
    plain = sample_euler(model, noise, text, null, SamplingOptions(num_steps=4, guidance=4.0), FLOW)
    osc = SamplingOptions(num_steps=4, guidance=4.0, guidance_oscillation=True, oscillation_after=1)
    assert not torch.allclose(plain, sample_euler(model, noise, text, null, osc, FLOW))
