"""Inputs of the MMDiT: tokens from latents and back, position ids, the reference condition.

Token order is (t, h, w) row-major and token channels are (c, ph, pw), as in Open-Sora 2.0,
so ``img_in`` and ``cond_in`` of its released checkpoint read them correctly.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor


def patchify(latents: Tensor, patch_size: int = 2) -> Tensor:
    """Cut 1 x p x p patches: latents (B, C, T, H, W) -> tokens (B, T*(H/p)*(W/p), C*p*p)."""
    _, _, _, h, w = latents.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"latent height and width ({h}, {w}) must be multiples of patch_size {patch_size}")
    return rearrange(latents, "b c t (h ph) (w pw) -> b (t h w) (c ph pw)", ph=patch_size, pw=patch_size)


def unpatchify(tokens: Tensor, t: int, h: int, w: int, patch_size: int = 2) -> Tensor:
    """Inverse of :func:`patchify`: tokens (B, t*(h/p)*(w/p), C*p*p) -> latents (B, C, t, h, w).

    t, h, w are the latent frames, height and width.
    """
    return rearrange(
        tokens,
        "b (t h w) (c ph pw) -> b c t (h ph) (w pw)",
        t=t,
        h=h // patch_size,
        w=w // patch_size,
        ph=patch_size,
        pw=patch_size,
    )


def prepare_img_ids(
    t: int, h: int, w: int, batch_size: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """Position ids of a t x h x w token grid (h, w in tokens, after patchify) -> (B, t*h*w, 3) float32.

    Column 0 is the frame index, 1 the row, 2 the column; token order matches :func:`patchify`.
    """
    grid = torch.meshgrid(
        torch.arange(t, device=device),
        torch.arange(h, device=device),
        torch.arange(w, device=device),
        indexing="ij",
    )
    ids = torch.stack(grid, dim=-1).float()
    return repeat(ids, "t h w c -> b (t h w) c", b=batch_size)


def prepare_txt_ids(batch_size: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Text tokens all sit at position 0 on every axis (no rotation): (B, Lt, 3) zeros."""
    return torch.zeros(batch_size, length, 3, device=device)


def prepare_cond(mask: Tensor, ref_latents: Tensor, patch_size: int = 2) -> Tensor:
    """Condition tokens for ``cond_in`` from reference latents and where they are known.

    mask: (B, T) per latent frame, or (B, 1, T, H, W); 1 where the reference holds, 0 elsewhere.
    ref_latents: (B, C, T, H, W). Returns (B, T*(H/p)*(W/p), (C + 1)*p*p): the patchified
    channels [mask, ref_latents * mask].
    """
    b, _, t, h, w = ref_latents.shape
    if mask.dim() == 2:
        if mask.shape != (b, t):
            raise ValueError(f"a per-frame mask must be (B, T) = {(b, t)}, got {tuple(mask.shape)}")
        mask = mask[:, None, :, None, None].expand(b, 1, t, h, w)
    if mask.shape != (b, 1, t, h, w):
        raise ValueError(
            f"mask must be (B, T) or (B, 1, T, H, W) = {(b, 1, t, h, w)}, got {tuple(mask.shape)}"
        )
    mask = mask.to(ref_latents.dtype)
    return patchify(torch.cat((mask, ref_latents * mask), dim=1), patch_size)
