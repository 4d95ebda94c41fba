"""EMA: the update rule, fp32 shadow under bf16 weights, copy_to and state round trip."""

from __future__ import annotations

import pytest
import torch

from opensora_core.training.ema import EMA


def _model(value: float, dtype=torch.float32) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_update_follows_the_closed_form():
    model = _model(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    for _ in range(5):
        ema.update(model)
    # s_k = p + decay^k (s_0 - p) for constant weights p
    expected = 3.0 + 0.9**5 * (1.0 - 3.0)
    for shadow in ema.shadow.values():
        torch.testing.assert_close(shadow, torch.full_like(shadow, expected))
    assert ema.num_updates == 5
    ema.update(model, decay=0.0)  # decay 0 copies the weights
    assert all(torch.equal(s, torch.full_like(s, 3.0)) for s in ema.shadow.values())


def test_shadow_is_fp32_and_keeps_updates_bf16_would_lose():
    model = _model(1.0, torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    ema.update(model)
    # 1 + 0.001 * (2 - 1) is representable in fp32 but rounds back to 1.0 in bf16.
    shadow = next(iter(ema.shadow.values()))
    assert shadow[0, 0].item() == pytest.approx(1.001, abs=1e-6)
    assert torch.tensor(1.001, dtype=torch.bfloat16).item() == 1.0

    target = _model(0.0, torch.bfloat16)
    ema.copy_to(target)
    assert all(p.dtype == torch.bfloat16 for p in target.parameters())
    torch.testing.assert_close(target.weight.float(), shadow.to(torch.bfloat16).float())


def test_state_dict_round_trip_and_mismatch():
    model = _model(0.5)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    state = ema.state_dict()

    other = EMA(_model(0.0), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.99 and other.num_updates == 1
    for name, value in ema.shadow.items():
        assert torch.equal(other.shadow[name], value)

    with pytest.raises(KeyError, match="does not match"):
        EMA(torch.nn.Linear(3, 2, bias=False)).load_state_dict(state)
