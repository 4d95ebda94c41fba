"""predict_velocity: latent-shaped velocity, batch independence, the reference condition reaching the model."""

from __future__ import annotations

import torch

from opensora_core.diffusion.conditions import build_conditions
from opensora_core.diffusion.denoiser import predict_velocity
from opensora_core.models.mmdit.model import build_mmdit
from opensora_core.models.text.encoders import TextEmbeddings


def make_inputs(b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = build_mmdit("tiny")
    # Random weights everywhere (the default init zeroes the output layer and cond_in).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(b, 8, 3, 4, 6, generator=g)
    text = TextEmbeddings(
        tokens=torch.randn(b, 5, 384, generator=g),
        mask=torch.ones(b, 5, dtype=torch.bool),
        pooled=torch.randn(b, 384, generator=g),
    )
    return model, x, text


def test_velocity_has_the_latent_shape_and_is_per_sample() -> None:
    model, x, text = make_inputs()
    t = torch.tensor([0.3, 0.7])
    v = predict_velocity(model, x, t, text)
    assert v.shape == x.shape and v.dtype == torch.float32
    alone = predict_velocity(model, x[1:], t[1:], text.select(slice(1, 2)))
    torch.testing.assert_close(v[1:], alone, rtol=1e-4, atol=1e-5)


def test_reference_condition_changes_only_through_cond_in() -> None:
    model, x, text = make_inputs()
    t = torch.tensor([0.5, 0.5])
    cond = build_conditions(["i2v_head", "t2v"], x)
    plain = predict_velocity(model, x, t, text)
    with_ref = predict_velocity(model, x, t, text, cond.mask, cond.masked_ref)
    assert not torch.allclose(plain[0], with_ref[0])  # i2v_head: a reference frame is given
    # t2v has an all-zero mask and reference: identical to no condition at all.
    torch.testing.assert_close(plain[1], with_ref[1], rtol=1e-4, atol=1e-5)
