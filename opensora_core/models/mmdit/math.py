"""Rotary position embedding and joint attention (the two pieces of math every block shares).

Layout: tokens-first, q/k/v are (B, L, H, D); rotations are complex numbers (B, L, 1, D/2), so
applying one is a single complex multiply. Channel pairs (2i, 2i+1) rotate together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Rotate q and k by ``pe``, attend with SDPA. q, k, v: (B, L, H, D); pe: (B, L, 1, D/2) -> (B, L, H*D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return rearrange(x, "B H L D -> B L (H D)")


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotations of one axis: pos (B, L) -> (B, L, dim/2) complex64, exp(i * pos * theta^(-2j/dim))."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = pos.to(torch.float64)[..., None] * omega
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate the channel pairs of x (B, L, H, D) by pe (B, L, 1, D/2), in float32; returns x's dtype."""
    x_ = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(x_ * pe).flatten(-2).type_as(x)
