"""The blocks of the MMDiT: embedders, adaLN modulation, QK-normalised attention, double- and
single-stream blocks and the last layer.

Parameter names follow Open-Sora 2.0's released checkpoint (unfused ``q_proj``/``k_proj``/``v_proj``,
``v_mlp``); the projections that read the same input are still run as one matrix multiply.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opensora_core.models.mmdit.math import attention, rope


class EmbedND(nn.Module):
    """Rotary embedding over N position axes (t, h, w): axis i takes ``axes_dim[i]`` of the head dim."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]) -> None:
        super().__init__()
        if sum(axes_dim) != dim:
            raise ValueError(f"axes_dim {axes_dim} must sum to the head dim {dim}")
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        """ids: (B, L, n_axes) positions -> pe: (B, L, 1, D/2) complex64 rotations."""
        pe = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-1)
        return pe.unsqueeze(2)


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding of timesteps in [0, 1]: t (B,) -> (B, dim) float32, [cos | sin] halves."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, used for the timestep, guidance and pooled-text vectors."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_dim) -> (B, hidden_dim)."""
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned ``scale`` (one per channel)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim), same dtype."""
        return F.rms_norm(x, self.scale.shape, self.scale.to(x.dtype), self.eps)


class QKNorm(nn.Module):
    """Separate RMSNorms for queries and keys, per head (stabilises attention logits)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """q, k: (B, L, H, D) -> normalised q, k in v's dtype."""
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class ModulationOut(NamedTuple):
    shift: Tensor
    scale: Tensor
    gate: Tensor


def modulate(x: Tensor, mod: ModulationOut) -> Tensor:
    """adaLN: (1 + scale) * x + shift, with x (B, L, C) and shift, scale (B, 1, C)."""
    return torch.addcmul(mod.shift, 1 + mod.scale, x)


class Modulation(nn.Module):
    """adaLN parameters from the conditioning vector: one (shift, scale, gate) triple, or two if ``double``."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        """vec: (B, C) -> triples of (B, 1, C) tensors (the second is None unless ``double``)."""
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _fused_linear(x: Tensor, layers: list[nn.Linear], fused: bool = True) -> Tensor:
    """Apply several Linear layers that read the same x as one matmul; outputs concatenated on the last dim.

    ``fused=False`` runs one matmul per layer (Open-Sora 2.0's released layout; same math), which
    ``benchmarks/train_step.py --no-fused-qkv`` measures against. Layers wrapped by an adapter
    (LoRA: not a plain ``nn.Linear``) always run their own forward, so the adapter's term is not
    skipped.
    """
    if not fused or any(type(layer) is not nn.Linear for layer in layers):
        return torch.cat([layer(x) for layer in layers], dim=-1)
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias)


class SelfAttention(nn.Module):
    """One stream's attention weights in a double block: q/k/v projections, QK norm, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, fused_qkv: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.fused_qkv = fused_qkv
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, L, C) -> q, k, v: (B, L, H, D), q and k normalised."""
        qkv = _fused_linear(x, [self.q_proj, self.k_proj, self.v_proj], self.fused_qkv)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(dim=2)
        q, k = self.norm(q, k, v)
        return q, k, v


def _mlp(dim: int, mlp_ratio: float) -> nn.Sequential:
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text tokens keep separate weights (modulation, attention, MLP) but attend jointly."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool = False,
        fused_qkv: bool = True,
    ) -> None:
        super().__init__()
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias, fused_qkv=fused_qkv)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_ratio)

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias, fused_qkv=fused_qkv)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_ratio)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """img: (B, Li, C), txt: (B, Lt, C), vec: (B, C), pe: (B, Lt+Li, 1, D/2) -> img, txt (same shapes)."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        # joint attention over [txt, img]: each stream projects with its own weights
        img_q, img_k, img_v = self.img_attn.qkv(modulate(self.img_norm1(img), img_mod1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv(modulate(self.txt_norm1(txt), txt_mod1))
        q, k, v = (torch.cat(pair, dim=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = torch.addcmul(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod2.gate, self.img_mlp(modulate(self.img_norm2(img), img_mod2)))
        txt = torch.addcmul(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod2.gate, self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One weight set over the joint sequence; attention and MLP run in parallel from one input projection."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, fused_qkv: bool = True
    ) -> None:
        super().__init__()
        self.fused_qkv = fused_qkv
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_mlp = nn.Linear(hidden_size, hidden_size + self.mlp_hidden_dim)  # [v | mlp input]
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # [attn | mlp out] -> x
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        """x: (B, L, C) joint [txt, img] tokens, vec: (B, C), pe: (B, L, 1, D/2) -> (B, L, C)."""
        mod, _ = self.modulation(vec)
        x_mod = modulate(self.pre_norm(x), mod)
        c = self.hidden_size
        q, k, v, mlp = _fused_linear(x_mod, [self.q_proj, self.k_proj, self.v_mlp], self.fused_qkv).split(
            [c, c, c, self.mlp_hidden_dim], dim=-1
        )
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)) for t in (q, k, v))
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), dim=-1))
        return torch.addcmul(x, mod.gate, out)


class LastLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from the hidden size to the token channels."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """x: (B, L, C), vec: (B, C) -> (B, L, out_channels)."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, 1 + scale, self.norm_final(x)))
