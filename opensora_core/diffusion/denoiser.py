"""The model as the flow sees it: latents in, velocity out, in the latents' own shape.

Training and every sampler call :func:`predict_velocity`, so patchify, position ids and the
reference condition are prepared in one place.
"""

from __future__ import annotations

from torch import Tensor

from opensora_core.models.mmdit.model import MMDiT
from opensora_core.models.mmdit.prepare import (
    patchify,
    prepare_cond,
    prepare_img_ids,
    prepare_txt_ids,
    unpatchify,
)
from opensora_core.models.text.encoders import TextEmbeddings


def predict_velocity(
    model: MMDiT,
    x_t: Tensor,
    t: Tensor,
    text: TextEmbeddings,
    cond_mask: Tensor | None = None,
    cond_ref: Tensor | None = None,
) -> Tensor:
    """Velocity of the rectified flow at ``x_t``.

    x_t: (B, C, T, H, W) noisy latents; t: (B,) in [0, 1] (1 = noise); text: B prompts' token
    states (B, L, D) and pooled vectors (B, Dp); cond_mask: (B, 1, T, H, W) or (B, T), 1 on latent
    frames given as reference; cond_ref: (B, C, T, H, W) reference latents (masked inside).
    Returns (B, C, T, H, W) in float32.
    """
    p = model.config.patch_size
    b, _, frames, h, w = x_t.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
    img = patchify(x_t, p)
    img_ids = prepare_img_ids(frames, h // p, w // p, batch_size=b, device=x_t.device)
    txt_ids = prepare_txt_ids(b, text.tokens.shape[1], device=x_t.device)
    cond = None
    if cond_mask is not None and cond_ref is not None and model.cond_in is not None:
        cond = prepare_cond(cond_mask, cond_ref, p)
    out = model(img, img_ids, text.tokens, txt_ids, t, text.pooled, cond=cond)
    return unpatchify(out.float(), frames, h, w, p)
