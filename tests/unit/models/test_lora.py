"""LoRA on the tiny MMDiT (peft): what trains, that a fresh adapter changes nothing, that merged
weights give the adapter's output, adapter files round trip, and the errors of bad adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opensora_core.config import LORA_DEFAULT_TARGETS, LoraConfig
from opensora_core.errors import ConfigError, InputError
from opensora_core.models.lora import (
    adapter_state_dict,
    apply_adapter,
    apply_lora,
    count_parameters,
    is_lora,
    merge_lora,
    merged_state_dict,
    save_adapter,
    set_lora_scale,
)
from opensora_core.models.mmdit import MMDiT, build_mmdit
from opensora_core.models.mmdit.prepare import prepare_img_ids, prepare_txt_ids


def tiny_inputs(model: MMDiT, seed: int = 0) -> dict[str, torch.Tensor]:
    """One (B=2) forward's inputs: img (B, L, C), ids, txt (B, Lt, D), t (B,), y_vec (B, D)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    frames, h, w, lt = 2, 4, 4, 5
    return {
        "img": torch.randn(2, frames * h * w, c.in_channels, generator=g),
        "img_ids": prepare_img_ids(frames, h, w, 2),
        "txt": torch.randn(2, lt, c.context_in_dim, generator=g),
        "txt_ids": prepare_txt_ids(2, lt),
        "timesteps": torch.rand(2, generator=g),
        "y_vec": torch.randn(2, c.vec_in_dim, generator=g),
    }


def randomize_adapter(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture
def base() -> MMDiT:
    """The tiny MMDiT with every weight random (at init its last layer is zero: output 0)."""
    torch.manual_seed(0)
    model = build_mmdit("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def test_default_targets_wrap_attention_and_mlp_of_every_block(base: MMDiT) -> None:
    targets = apply_lora(base, LoraConfig(enabled=True))
    cfg = base.config
    per_double, per_single = 2 * (4 + 2), 4  # img/txt: q, k, v, proj + two MLP linears; single: 4
    assert len(targets) == cfg.depth * per_double + cfg.depth_single_blocks * per_single
    assert "double_blocks.1.txt_mlp.2" in targets and "single_blocks.3.linear2" in targets
    assert all(".lora_" in n for n, p in base.named_parameters() if p.requires_grad)
    trainable, total = count_parameters(base)
    assert 0 < trainable <= 0.05 * total, f"LoRA trains {trainable / total:.2%} of the parameters"


def test_fresh_adapter_leaves_the_output_unchanged_and_gradients_reach_it(base: MMDiT) -> None:
    inputs = tiny_inputs(base)
    before = base(**inputs)
    apply_lora(base, LoraConfig(enabled=True, rank=2))
    after = base(**inputs)
    # the same numbers up to rounding (wrapped q/k/v run as three matmuls, not one fused)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    after.square().mean().backward()
    grads = {n: p.grad for n, p in base.named_parameters() if p.requires_grad}
    # B starts at zero, so A's gradient is zero on the first step; B's must not be.
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
    assert all(p.grad is None for n, p in base.named_parameters() if not p.requires_grad)


def test_merged_weights_equal_base_plus_adapter(base: MMDiT) -> None:
    inputs = tiny_inputs(base)
    plain_out = base(**inputs)
    apply_lora(base, LoraConfig(enabled=True, rank=4, alpha=8.0))
    randomize_adapter(base)
    with torch.no_grad():
        lora_out = base(**inputs)
        merged = build_mmdit("tiny").eval()
        merged.load_state_dict(merged_state_dict(base))  # plain keys, strict
        merged_out = merged(**inputs)
    assert not torch.allclose(lora_out, plain_out, atol=1e-3), "the adapter changed nothing"
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-4, atol=1e-5)
    # scale 0 turns the adapter off; merging in place gives plain Linears back
    set_lora_scale(base, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs), plain_out, rtol=1e-5, atol=1e-6)
    set_lora_scale(base, 1.0)
    merge_lora(base)
    assert not is_lora(base)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs), lora_out, rtol=1e-4, atol=1e-5)


def test_adapter_folder_round_trip_and_scale(base: MMDiT, tmp_path: Path) -> None:
    inputs = tiny_inputs(base)
    reference = build_mmdit("tiny").eval()
    reference.load_state_dict(base.state_dict())
    with torch.no_grad():
        base_out = base(**inputs)
    cfg = LoraConfig(enabled=True, rank=2, alpha=4.0, target_modules=["single_blocks.*.v_mlp"])
    targets = apply_lora(base, cfg)
    randomize_adapter(base)
    save_adapter(tmp_path / "adapter", adapter_state_dict(base), cfg, targets, {"sha256": "abc"})
    with torch.no_grad():
        want = base(**inputs)
        meta = apply_adapter(reference, tmp_path / "adapter", scale=1.0)
        torch.testing.assert_close(reference(**inputs), want)
        set_lora_scale(reference, 0.0)
        none = reference(**inputs)
        set_lora_scale(reference, 0.5)
        half = reference(**inputs)
        merged = build_mmdit("tiny").eval()
        merged.load_state_dict(merged_state_dict(reference))
        merged_half = merged(**inputs)
    assert meta["base"] == {"sha256": "abc"} and meta["rank"] == 2
    torch.testing.assert_close(none, base_out, rtol=1e-5, atol=1e-6)  # scale 0: the base alone
    assert not torch.allclose(half, want, atol=1e-4) and not torch.allclose(half, none, atol=1e-4)
    torch.testing.assert_close(merged_half, half, rtol=1e-4, atol=1e-5)  # merging keeps the scale


def test_bad_targets_and_foreign_adapters_are_errors(base: MMDiT, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.*matches no Linear"):
        apply_lora(base, LoraConfig(enabled=True, target_modules=["double_blocks.*.nope"]))
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(enabled=True, rank=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoraConfig(enabled=True, dropout=1.5)
    # an adapter trained on the twice-as-wide `small` size does not fit `tiny`
    small = build_mmdit("small")
    cfg = LoraConfig(enabled=True, rank=2)
    targets = apply_lora(small, cfg)
    save_adapter(tmp_path / "small", adapter_state_dict(small), cfg, targets, {})
    with pytest.raises(InputError, match="does not fit") as err:
        apply_adapter(base, tmp_path / "small")
    assert err.value.exit_code == 2
    assert list(LORA_DEFAULT_TARGETS) == LoraConfig().target_modules
