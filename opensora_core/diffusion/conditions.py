"""Visual conditions: which latent frames a sample is given, and which the loss ignores.

Condition types (T' = latent frames of the clip):

| type | conditioned latent frames |
| --- | --- |
| ``t2v`` | none (text only) |
| ``i2v_head`` | the first |
| ``i2v_tail`` | the last |
| ``i2v_loop`` | the first and the last |
| ``v2v_head`` | the first ``v2v_frames`` (0 = T' // 2) |
| ``v2v_tail`` | the last ``v2v_frames`` (0 = T' // 2) |

A type is available for a clip only when it conditions at least one frame and leaves at least
one to generate (``t2v`` always is): stills (T' = 1) are always ``t2v``, ``i2v_loop`` needs
T' >= 3, v2v needs its frame count below T'. Types are drawn per sample with the configured
weights renormalised among the available ones.

For a conditioned sample the model receives ``masked_ref = latents * mask`` and ``mask`` (1 on
conditioned frames) beside the noisy latents, and ``loss_mask`` (0 on conditioned frames) keeps
the given frames out of the loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opensora_core.config import CONDITION_TYPES
from opensora_core.config import ConditionConfig as ConditionConfig


class Condition(NamedTuple):
    """Visual condition of one sample (or a batch, with a leading B on every tensor).

    mask: (1, T, H, W) latents' dtype, 1 on conditioned latent frames.
    masked_ref: (C, T, H, W) = latents * mask.
    loss_mask: (T,) float32, 0 on conditioned latent frames, 1 elsewhere.
    """

    mask: torch.Tensor
    masked_ref: torch.Tensor
    loss_mask: torch.Tensor


def get_condition_frames(cond_type: str, num_frames: int, v2v_frames: int = 0) -> list[int]:
    """Indices of the latent frames ``cond_type`` conditions in a clip of ``num_frames`` latent frames."""
    if cond_type not in CONDITION_TYPES:
        raise ValueError(f"unknown condition type {cond_type!r}; valid types: {', '.join(CONDITION_TYPES)}")
    t = num_frames
    n = min(v2v_frames or t // 2, t)
    frames = {
        "t2v": [],
        "i2v_head": [0],
        "i2v_tail": [t - 1],
        "i2v_loop": sorted({0, t - 1}),
        "v2v_head": list(range(n)),
        "v2v_tail": list(range(t - n, t)),
    }[cond_type]
    return frames


def is_available(cond_type: str, num_frames: int, v2v_frames: int = 0) -> bool:
    """Whether ``cond_type`` conditions at least one latent frame and leaves at least one free (t2v: always)."""
    if cond_type == "t2v":
        return True
    n = len(get_condition_frames(cond_type, num_frames, v2v_frames))
    return 0 < n < num_frames


def available_weights(weights: dict[str, float], num_frames: int, v2v_frames: int = 0) -> dict[str, float]:
    """Weights (summing to 1) of the types available for ``num_frames`` latent frames.

    Falls back to ``{"t2v": 1.0}`` when no type with a positive weight is available.
    """
    kept = {
        k: float(weights.get(k, 0.0))
        for k in CONDITION_TYPES
        if weights.get(k, 0.0) > 0 and is_available(k, num_frames, v2v_frames)
    }
    total = sum(kept.values())
    if total <= 0:
        return {"t2v": 1.0}
    return {k: w / total for k, w in kept.items()}


def sample_condition_types(
    batch_size: int,
    weights: dict[str, float],
    num_frames: int,
    *,
    v2v_frames: int = 0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Draw ``batch_size`` condition types for clips of ``num_frames`` latent frames.

    Always draws ``batch_size`` uniforms from ``generator`` (CPU), so the stream advances by the
    same amount whatever the weights.
    """
    probs = available_weights(weights, num_frames, v2v_frames)
    types = list(probs)
    cdf = torch.tensor([probs[k] for k in types], dtype=torch.float64).cumsum(0)
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u, right=True).clamp(max=len(types) - 1)
    return [types[i] for i in idx.tolist()]


def build_condition(cond_type: str, latents: torch.Tensor, v2v_frames: int = 0) -> Condition:
    """Mask, masked reference and loss mask of ``cond_type`` for ``latents``.

    latents: (C, T, H, W) gives mask (1, T, H, W), masked_ref (C, T, H, W), loss_mask (T,);
    (B, C, T, H, W) applies the same type to every sample and adds a leading B to each.
    """
    if latents.ndim == 5:
        return build_conditions([cond_type] * latents.shape[0], latents, v2v_frames)
    if latents.ndim != 4:
        raise ValueError(f"latents must be (C, T, H, W) or (B, C, T, H, W), got {tuple(latents.shape)}")
    _, t, h, w = latents.shape
    frames = get_condition_frames(cond_type, t, v2v_frames)
    frame_mask = torch.zeros(t, dtype=latents.dtype, device=latents.device)
    frame_mask[frames] = 1
    mask = frame_mask[None, :, None, None].expand(1, t, h, w).contiguous()
    loss_mask = (1 - frame_mask).float()
    return Condition(mask=mask, masked_ref=latents * mask, loss_mask=loss_mask)


def build_conditions(cond_types: list[str], latents: torch.Tensor, v2v_frames: int = 0) -> Condition:
    """Batched :func:`build_condition`: one type per sample of latents (B, C, T, H, W).

    Returns mask (B, 1, T, H, W), masked_ref (B, C, T, H, W), loss_mask (B, T).
    """
    if latents.ndim != 5 or len(cond_types) != latents.shape[0]:
        raise ValueError(
            f"need latents (B, C, T, H, W) and B condition types, got {tuple(latents.shape)} and {len(cond_types)}"
        )
    parts = [build_condition(k, x, v2v_frames) for k, x in zip(cond_types, latents)]
    return Condition(*(torch.stack(tensors) for tensors in zip(*parts)))
