"""Contract tests of the MMDiT: checkpoint layout, shapes, gradients, determinism, checkpointing, math."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opensora_core.errors import ConfigError
from opensora_core.models.mmdit import (
    MMDiTConfig,
    build_mmdit,
    get_mmdit_config,
    patchify,
    prepare_cond,
    prepare_img_ids,
    prepare_txt_ids,
    unpatchify,
)
from opensora_core.models.mmdit.layers import EmbedND, timestep_embedding
from opensora_core.models.mmdit.math import apply_rope, attention, rope

# State-dict names and shapes of Open-Sora 2.0's MMDiT, read from its code on the meta device,
# for the released 11B config and a tiny one (a copy of shared/reference/opensora_v2_mmdit_keys.json).
REFERENCE = Path(__file__).with_name("opensora_v2_mmdit_keys.json")

# The reference's tiny config (see shared/reference/README.md).
TINY_REFERENCE_CONFIG = MMDiTConfig(
    in_channels=16,
    vec_in_dim=16,
    context_in_dim=32,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[8, 12, 12],
    cond_embed=True,
)


def _reference() -> dict:
    return json.loads(REFERENCE.read_text())


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _inputs(config: MMDiTConfig, batch: int = 2, grid=(2, 3, 2), txt_len: int = 5, seed: int = 0) -> dict:
    """Random model inputs for a (t, h, w) token grid."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    latents = torch.randn(
        batch, config.latent_channels, t, h * config.patch_size, w * config.patch_size, generator=g
    )
    mask = torch.zeros(batch, t)
    mask[:, 0] = 1.0  # first frame given as reference
    return {
        "img": patchify(latents, config.patch_size),
        "img_ids": prepare_img_ids(t, h, w, batch),
        "txt": torch.randn(batch, txt_len, config.context_in_dim, generator=g),
        "txt_ids": prepare_txt_ids(batch, txt_len),
        "timesteps": torch.rand(batch, generator=g),
        "y_vec": torch.randn(batch, config.vec_in_dim, generator=g),
        "cond": prepare_cond(mask, torch.randn(latents.shape, generator=g), config.patch_size),
    }


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace every weight (zero-initialised ones included) by random values, so nothing blocks gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 and p.numel() < 256 else 0.0)
            )


# --------------------------------------------------------------------------------------------
# Checkpoint layout
# --------------------------------------------------------------------------------------------
def test_tiny_reference_config_matches_every_key_and_shape():
    expected = _reference()["tiny_2x2_cond"]
    got = _shapes(build_mmdit(TINY_REFERENCE_CONFIG))
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    assert got == expected


def test_released_11b_matches_every_key_and_shape_on_meta():
    expected = _reference()["opensora_v2_11b"]
    model = build_mmdit("opensora-v2-11b", device="meta")
    assert all(p.is_meta for p in model.parameters())
    got = _shapes(model)
    assert sorted(set(got) ^ set(expected)) == []
    assert got == expected
    assert len(got) == 1082
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.89e9, rel=1e-3)


def test_named_sizes():
    tiny = get_mmdit_config("tiny")
    assert (tiny.context_in_dim, tiny.vec_in_dim, tiny.in_channels) == (384, 384, 8 * 2 * 2)
    assert 64 <= tiny.hidden_size <= 128
    assert MMDiTConfig() == tiny  # the dataclass defaults are the CPU default
    small = build_mmdit("small", device="meta")
    assert (small.config.context_in_dim, small.config.in_channels) == (tiny.context_in_dim, tiny.in_channels)
    assert small.config.hidden_size == 2 * tiny.hidden_size
    assert small.config.hidden_size // small.config.num_heads == tiny.hidden_size // tiny.num_heads
    assert sum(p.numel() for p in small.parameters()) == pytest.approx(9.23e6, rel=0.01)
    one_b = build_mmdit("1B", device="meta")
    assert (one_b.config.hidden_size, one_b.config.num_heads) == (1536, 12)
    assert (len(one_b.double_blocks), len(one_b.single_blocks)) == (8, 16)
    assert sum(p.numel() for p in one_b.parameters()) == pytest.approx(1.26e9, rel=0.01)
    io = get_mmdit_config("tiny-1b-io")  # the tiny transformer on the 1B's input widths
    widths = ("in_channels", "vec_in_dim", "context_in_dim", "patch_size")
    assert [getattr(io, k) for k in widths] == [getattr(one_b.config, k) for k in widths]
    assert io.hidden_size == tiny.hidden_size and io.depth == tiny.depth
    assert get_mmdit_config("tiny", depth=1).depth == 1
    with pytest.raises(ConfigError, match="known sizes"):
        get_mmdit_config("huge")
    with pytest.raises(ConfigError, match="deepth"):
        get_mmdit_config("tiny", deepth=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 100, "num_heads": 3}, "divisible"),
        ({"axes_dim": [8, 12, 14]}, "sum to the head dim"),
        ({"axes_dim": [7, 13, 12]}, "even"),
        ({"in_channels": 30}, "patch_size"),
        ({"checkpoint_blocks": -2}, "checkpoint_blocks"),
    ],
)
def test_invalid_configs_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MMDiTConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------
def test_output_shape_and_zero_output_at_init():
    torch.manual_seed(0)
    model = build_mmdit("tiny")
    inputs = _inputs(model.config, batch=3, grid=(2, 3, 4), txt_len=7)
    out = model(**inputs)
    assert out.shape == (3, 2 * 3 * 4, model.config.in_channels)
    assert out.dtype == torch.float32
    # adaLN-Zero and a zero last layer: the prediction starts at exactly zero
    assert torch.count_nonzero(out) == 0
    _randomize(model)
    out = model(**inputs)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_condition_changes_the_output_and_none_equals_zero_condition():
    model = build_mmdit("tiny")
    _randomize(model)
    inputs = _inputs(model.config)
    with torch.no_grad():
        with_cond = model(**inputs)
        no_cond = model(**{**inputs, "cond": None})
        zero_cond = model(**{**inputs, "cond": torch.zeros_like(inputs["cond"])})
    assert not torch.allclose(with_cond, no_cond)
    torch.testing.assert_close(no_cond, zero_cond)


def test_cond_and_guidance_arguments_are_checked():
    plain = build_mmdit("tiny", cond_embed=False)
    inputs = _inputs(plain.config)
    assert "cond_in.weight" not in plain.state_dict()
    with pytest.raises(ValueError, match="cond_in"):
        plain(**inputs)
    guided = build_mmdit("tiny", guidance_embed=True)
    assert "guidance_in.in_layer.weight" in guided.state_dict()
    with pytest.raises(ValueError, match="guidance"):
        guided(**inputs)
    assert guided(**inputs, guidance=torch.full((2,), 4.0)).shape == inputs["img"].shape


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_mmdit("tiny")
    inputs = _inputs(model.config)
    target = torch.randn(inputs["img"].shape)
    # 1. default init: zero-initialised layers block some gradients, but every parameter gets one
    F.mse_loss(model(**inputs), target).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    # 2. with every weight random, every gradient is finite and non-zero (the cond path included)
    model.zero_grad(set_to_none=True)
    _randomize(model)
    F.mse_loss(model(**inputs), target).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_deterministic_under_a_seed():
    def run(seed: int) -> tuple[dict, torch.Tensor]:
        torch.manual_seed(seed)
        model = build_mmdit("tiny")
        init = {k: v.clone() for k, v in model.state_dict().items()}
        _randomize(model, seed=1)  # non-zero weights everywhere, so the outputs say something
        return init, model(**_inputs(model.config))

    sd_a, out_a = run(0)
    sd_b, out_b = run(0)
    sd_c, _ = run(1)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("checkpoint_blocks", [-1, 3])
def test_activation_checkpointing_gives_the_same_output_and_grads(checkpoint_blocks):
    reference = build_mmdit("tiny")
    _randomize(reference)
    ckpt = build_mmdit("tiny", checkpoint_blocks=checkpoint_blocks)
    ckpt.load_state_dict(reference.state_dict())
    inputs = _inputs(reference.config)

    calls = {"n": 0}
    ckpt.double_blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    outs, grads = [], []
    for model in (reference, ckpt):
        out = model(**inputs)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], msg=name)
    assert calls["n"] == 2  # the first block ran again in backward: it was checkpointed


def test_unfused_projections_give_the_same_output_and_state_dict():
    fused = build_mmdit("tiny")
    _randomize(fused)
    unfused = build_mmdit("tiny", fused_qkv=False)
    unfused.load_state_dict(fused.state_dict())  # same parameter names: only the matmul layout differs
    inputs = _inputs(fused.config)
    calls = {"n": 0}
    linear = torch.nn.functional.linear

    def counting_linear(*args, **kwargs):
        calls["n"] += 1
        return linear(*args, **kwargs)

    outs = []
    for model in (fused, unfused):
        calls["n"] = 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "linear", counting_linear)
            outs.append((model(**inputs), calls["n"]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    # unfused: 2 more matmuls per attention stream (2 per double block) and per single block
    config = fused.config
    assert outs[1][1] - outs[0][1] == 2 * (2 * config.depth + config.depth_single_blocks)


def test_bfloat16_forward():
    model = build_mmdit("tiny").to(torch.bfloat16)
    _randomize(model)
    out = model(**_inputs(model.config))  # float32 inputs are cast to the model's dtype
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --------------------------------------------------------------------------------------------
# Blocks against a plain, unfused computation (Open-Sora 2.0's formulation)
# --------------------------------------------------------------------------------------------
def _naive_rope(x: torch.Tensor, ids: torch.Tensor, axes_dim: list[int], theta: int) -> torch.Tensor:
    """Rotate pairs with explicit 2x2 matrices. x: (B, L, H, D), ids: (B, L, 3)."""
    angles = []
    for i, d in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(ids[..., i, None].double() * freqs)
    a = torch.cat(angles, dim=-1)[:, :, None]  # (B, L, 1, D/2)
    rot = torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], dim=-1).unflatten(-1, (2, 2)).float()
    pairs = x.float().unflatten(-1, (-1, 2))
    return torch.einsum("blhdij,blhdj->blhdi", rot, pairs).flatten(-2)


def _naive_attention(q, k, v, ids, config):
    q, k = (_naive_rope(t, ids, config.axes_dim, config.theta) for t in (q, k))
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), v).flatten(2)


def _rms(x, scale):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale


def _heads(x, n):
    return x.unflatten(-1, (n, -1))


def test_double_and_single_blocks_match_an_unfused_computation():
    torch.manual_seed(0)
    config = get_mmdit_config("tiny")
    model = build_mmdit(config)
    _randomize(model)
    b, lt, grid = 2, 3, (2, 2, 3)
    ids = torch.cat((prepare_txt_ids(b, lt), prepare_img_ids(*grid, b)), dim=1)
    img = torch.randn(b, math.prod(grid), config.hidden_size)
    txt = torch.randn(b, lt, config.hidden_size)
    vec = torch.randn(b, config.hidden_size)
    pe = model.pe_embedder(ids)
    n = config.num_heads

    block = model.double_blocks[0]
    with torch.no_grad():
        got_img, got_txt = block(img, txt, vec, pe)
        streams = {}
        for name, x in (("img", img), ("txt", txt)):
            attn_w = getattr(block, f"{name}_attn")
            m = getattr(block, f"{name}_mod").lin(F.silu(vec))[:, None].chunk(6, -1)
            xm = (1 + m[1]) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + m[0]
            q = _rms(_heads(attn_w.q_proj(xm), n), attn_w.norm.query_norm.scale)
            k = _rms(_heads(attn_w.k_proj(xm), n), attn_w.norm.key_norm.scale)
            streams[name] = (q, k, _heads(attn_w.v_proj(xm), n), m)
        q, k, v = (torch.cat((streams["txt"][i], streams["img"][i]), dim=1) for i in range(3))
        attn = _naive_attention(q, k, v, ids, config)
        expected = {}
        for name, x, part in (("txt", txt, attn[:, :lt]), ("img", img, attn[:, lt:])):
            m = streams[name][3]
            x = x + m[2] * getattr(block, f"{name}_attn").proj(part)
            x = x + m[5] * getattr(block, f"{name}_mlp")(
                (1 + m[4]) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + m[3]
            )
            expected[name] = x
    torch.testing.assert_close(got_img, expected["img"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_txt, expected["txt"], rtol=1e-4, atol=1e-4)

    single = model.single_blocks[0]
    x = torch.cat((txt, img), dim=1)
    with torch.no_grad():
        got = single(x, vec, pe)
        shift, scale, gate = single.modulation.lin(F.silu(vec))[:, None].chunk(3, -1)
        xm = (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift
        v, mlp = single.v_mlp(xm).split([config.hidden_size, single.mlp_hidden_dim], dim=-1)
        q = _rms(_heads(single.q_proj(xm), n), single.norm.query_norm.scale)
        k = _rms(_heads(single.k_proj(xm), n), single.norm.key_norm.scale)
        attn = _naive_attention(q, k, _heads(v, n), ids, config)
        expected = x + gate * single.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), dim=-1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Rotary embedding and attention math
# --------------------------------------------------------------------------------------------
def test_rope_shapes():
    config = get_mmdit_config("tiny")
    head_dim = config.hidden_size // config.num_heads
    ids = prepare_img_ids(2, 3, 4, batch_size=2)
    assert ids.shape == (2, 24, 3)
    assert rope(ids[..., 0], 8, 10_000).shape == (2, 24, 4)
    pe = EmbedND(head_dim, config.theta, config.axes_dim)(ids)
    assert pe.shape == (2, 24, 1, head_dim // 2) and pe.dtype == torch.complex64
    x = torch.randn(2, 24, config.num_heads, head_dim, dtype=torch.bfloat16)
    rotated = apply_rope(x, pe)
    assert rotated.shape == x.shape and rotated.dtype == torch.bfloat16
    out = attention(x, x, x, pe)
    assert out.shape == (2, 24, config.num_heads * head_dim)
    with pytest.raises(ValueError, match="sum to the head dim"):
        EmbedND(head_dim, 10_000, [8, 8, 8])


def test_rope_is_a_rotation_that_encodes_relative_position():
    d = 16
    q, k = torch.randn(2, 1, 1, d).unbind(0)

    def at(x, pos):
        return apply_rope(x[None], rope(torch.tensor([[float(pos)]]), d, 10_000)[:, :, None])[0]

    torch.testing.assert_close(at(q, 0), q)  # position 0 is the identity
    torch.testing.assert_close(at(q, 7).norm(), q.norm())  # norms are kept
    # <R(m) q, R(n) k> depends on m - n only
    torch.testing.assert_close(
        (at(q, 5) * at(k, 2)).sum(), (at(q, 13) * at(k, 10)).sum(), rtol=1e-4, atol=1e-4
    )
    assert not torch.allclose((at(q, 5) * at(k, 2)).sum(), (at(q, 5) * at(k, 3)).sum())


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0.0, 0.5, 1.0]), 256)
    assert emb.shape == (3, 256)
    torch.testing.assert_close(emb[0, :128], torch.ones(128))  # cos(0)
    torch.testing.assert_close(emb[0, 128:], torch.zeros(128))  # sin(0)
    assert timestep_embedding(torch.tensor([0.3]), 7).shape == (1, 7)


# --------------------------------------------------------------------------------------------
# Input preparation
# --------------------------------------------------------------------------------------------
def test_patchify_round_trip_and_token_order_match_position_ids():
    latents = torch.randn(2, 8, 3, 6, 4)
    tokens = patchify(latents, 2)
    assert tokens.shape == (2, 3 * 3 * 2, 8 * 4)
    torch.testing.assert_close(unpatchify(tokens, 3, 6, 4, 2), latents)
    ids = prepare_img_ids(3, 3, 2, batch_size=2)
    # token i holds the 2x2 patch at the (t, h, w) its ids name, channels ordered (c, ph, pw)
    for i in (0, 5, 17):
        t, h, w = ids[0, i].long().tolist()
        patch = latents[0, :, t, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2]
        torch.testing.assert_close(tokens[0, i], patch.reshape(-1))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        patchify(torch.randn(1, 8, 1, 5, 4), 2)


def test_prepare_cond():
    ref = torch.randn(2, 8, 3, 4, 4)
    frame_mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    cond = prepare_cond(frame_mask, ref, patch_size=2)
    assert cond.shape == (2, 3 * 2 * 2, (8 + 1) * 4)
    full_mask = frame_mask[:, None, :, None, None].expand(2, 1, 3, 4, 4)
    torch.testing.assert_close(cond, prepare_cond(full_mask, ref, patch_size=2))
    as_latents = unpatchify(cond, 3, 4, 4, 2)
    torch.testing.assert_close(as_latents[:, :1], full_mask)  # mask first, then the masked reference
    torch.testing.assert_close(as_latents[:, 1:], ref * full_mask)
    assert as_latents[0, 1:, 1:].abs().sum() == 0  # frames without reference carry no latents
    with pytest.raises(ValueError, match="mask"):
        prepare_cond(torch.ones(2, 4), ref)
    # the condition fits the cond_in of a model with the same latent channels
    model = build_mmdit("tiny")
    assert cond.shape[-1] == model.cond_in.in_features
