"""Samplers of the rectified flow: noise (t = 1) to latents (t = 0) over the shifted schedule.

Every sampler has one signature (k-diffusion's habit)::

    sampler(model, noise, text, null_text, opts, flow_cfg, cond_mask=None, cond_ref=None,
            generator=None) -> latents (B, C, T, H, W)

and calls the model only through :func:`opensora_core.diffusion.denoiser.predict_velocity`.
The schedule is :func:`opensora_core.diffusion.rectified_flow.get_schedule` with the training
config's shift, so sampling spends its steps where training put its times.

Guidance (Open-Sora 2.0's image-to-video denoiser). With a visual condition three predictions
are made in one batched call:

    v_c  = v(x, text,      reference)          conditional
    v_u  = v(x, null_text, reference)          text-unconditional
    v_uu = v(x, null_text, no reference)       fully unconditional
    v    = v_uu + guidance_img * (v_u - v_uu) + guidance * (v_c - v_u)

Without one it is classifier-free guidance, ``v = v_u + guidance * (v_c - v_u)``. Passes whose
weight is zero are skipped (guidance 1 without a reference is a single pass). A negative prompt
is the caller's ``null_text``: the embeddings of that prompt instead of the empty one.

Conditioned latent frames follow the reference's own path: before each model call they are set
to ``interpolate(ref, noise, t)``, exactly what training showed the model on those frames, and
the result holds the reference there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from opensora_core.diffusion.denoiser import predict_velocity
from opensora_core.diffusion.rectified_flow import RectifiedFlowConfig, get_schedule, interpolate
from opensora_core.errors import ConfigError
from opensora_core.models.mmdit.model import MMDiT
from opensora_core.models.text.encoders import TextEmbeddings


@dataclass
class SamplingOptions:
    """How to sample; shared by every sampler, the evaluate stage, the CLI and the pyfunc model."""

    num_steps: int = 30
    """Euler steps from noise to data."""
    guidance: float = 7.5
    """Text guidance scale (1 = no text guidance)."""
    guidance_img: float = 3.0
    """Image guidance scale, used when a visual condition is given (1 = no image guidance)."""
    guidance_oscillation: bool = False
    """Open-Sora 2.0's oscillating guidance: after the first ``oscillation_after`` steps, odd
    steps use scale 1 (no guidance) for text and image alike."""
    oscillation_after: int = 10
    """Steps with constant guidance before the oscillation starts."""
    use_shift: bool | None = None
    """Shift the schedule towards noise; None = the flow config's ``use_shift`` (as in training)."""
    shift_scale: float | None = None
    """Constant factor of the shift; None = the flow config's ``shift_scale``."""
    sampler: str = "euler"
    """Sampler name in :data:`SAMPLERS`."""
    progress: bool = False
    """Show a progress bar over the steps."""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.guidance < 0 or self.guidance_img < 0:
            raise ConfigError(f"guidance scales must be >= 0, got {self.guidance}, {self.guidance_img}")
        if self.oscillation_after < 0:
            raise ConfigError(f"oscillation_after must be >= 0, got {self.oscillation_after}")
        if self.shift_scale is not None and self.shift_scale <= 0:
            raise ConfigError(f"shift_scale must be > 0, got {self.shift_scale}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLERS)}")


def sampling_schedule(
    opts: SamplingOptions, flow_cfg: RectifiedFlowConfig, latent_shape: tuple[int, ...], patch_size: int
) -> Tensor:
    """Times (num_steps + 1,) from 1 to 0 for latents (B, C, T, H, W) cut into p x p patches.

    The shift uses the spatial tokens per latent frame, (H / p) * (W / p), and the T latent
    frames: the quantities training's shift used.
    """
    _, _, frames, h, w = latent_shape
    return get_schedule(
        opts.num_steps,
        (h // patch_size) * (w // patch_size),
        frames,
        base_tokens=flow_cfg.base_tokens,
        base_frames=flow_cfg.base_frames,
        scale=flow_cfg.shift_scale if opts.shift_scale is None else opts.shift_scale,
        shift=flow_cfg.use_shift if opts.use_shift is None else opts.use_shift,
    )


def guidance_at(opts: SamplingOptions, step: int) -> tuple[float, float]:
    """(text, image) guidance scales of step ``step`` (oscillation applied)."""
    if opts.guidance_oscillation and step >= opts.oscillation_after and step % 2 == 1:
        return 1.0, 1.0
    return opts.guidance, opts.guidance_img


def guided_velocity(
    model: MMDiT,
    x: Tensor,
    t: float,
    text: TextEmbeddings,
    null_text: TextEmbeddings,
    guidance: float,
    guidance_img: float,
    cond_mask: Tensor | None = None,
    cond_ref: Tensor | None = None,
) -> Tensor:
    """The guided velocity (B, C, T, H, W) at ``x`` (B, C, T, H, W) and time ``t``.

    text: B prompts; null_text: B rows (or one, repeated) for the unconditional passes;
    cond_mask (B, 1, T, H, W) or (B, T) and cond_ref (B, C, T, H, W), or both None.
    The needed passes (see the module docstring) run as one batched model call.
    """
    b = x.shape[0]
    null_text = _expand_text(null_text, b).to(device=x.device)
    text = text.to(device=x.device)
    has_ref = cond_mask is not None and cond_ref is not None
    # Weights of (v_c, v_u, v_uu) in the combination; a pass with weight 0 is not run.
    if has_ref:
        weights = (guidance, guidance_img - guidance, 1.0 - guidance_img)
    else:
        weights = (guidance, 1.0 - guidance, 0.0)
    passes = [i for i, wgt in enumerate(weights) if wgt != 0.0]
    texts = [text, null_text, null_text]
    masks = [cond_mask, cond_mask, None]
    refs = [cond_ref, cond_ref, None]

    batch_text = TextEmbeddings.cat([texts[i] for i in passes])
    batch_x = x.repeat(len(passes), *([1] * (x.ndim - 1)))
    batch_mask = batch_ref = None
    if has_ref:
        batch_mask = torch.cat(
            [masks[i] if masks[i] is not None else torch.zeros_like(cond_mask) for i in passes]
        )
        batch_ref = torch.cat(
            [refs[i] if refs[i] is not None else torch.zeros_like(cond_ref) for i in passes]
        )
    tt = torch.full((batch_x.shape[0],), float(t), device=x.device)
    v = predict_velocity(model, batch_x, tt, batch_text, batch_mask, batch_ref)
    out = torch.zeros_like(x, dtype=torch.float32)
    for k, i in enumerate(passes):
        out = out + weights[i] * v[k * b : (k + 1) * b]
    return out


@torch.no_grad()
def sample_euler(
    model: MMDiT,
    noise: Tensor,
    text: TextEmbeddings,
    null_text: TextEmbeddings,
    opts: SamplingOptions,
    flow_cfg: RectifiedFlowConfig,
    cond_mask: Tensor | None = None,
    cond_ref: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler integration of the guided velocity from ``noise`` (t = 1) to latents (t = 0).

    noise: (B, C, T, H, W) float32 (its own seed per sample gives batch-independent samples);
    text: B prompts' embeddings; null_text: the empty (or negative) prompt, 1 or B rows;
    cond_mask: (B, 1, T, H, W) or (B, T), 1 on given latent frames; cond_ref: (B, C, T, H, W)
    reference latents. ``generator`` is unused (the ODE is deterministic) and kept for the
    shared signature. Returns latents (B, C, T, H, W) float32.
    """
    del generator
    if len(text) != noise.shape[0]:
        raise ValueError(f"{len(text)} prompts for a batch of {noise.shape[0]} noise tensors")
    if (cond_mask is None) != (cond_ref is None):
        raise ValueError("cond_mask and cond_ref go together: pass both or neither")
    frame_mask = _frame_mask(cond_mask, noise) if cond_mask is not None else None
    ts = sampling_schedule(opts, flow_cfg, tuple(noise.shape), model.config.patch_size).tolist()
    x = noise.float().clone()
    steps = range(opts.num_steps)
    for i in tqdm(steps, desc="sampling", disable=not opts.progress, leave=False):
        t_curr, t_next = ts[i], ts[i + 1]
        if frame_mask is not None:
            x = _hold_reference(x, cond_ref, noise, frame_mask, t_curr, flow_cfg.sigma_min)
        g_txt, g_img = guidance_at(opts, i)
        v = guided_velocity(model, x, t_curr, text, null_text, g_txt, g_img, cond_mask, cond_ref)
        x = x + (t_next - t_curr) * v
    if frame_mask is not None:
        x = _hold_reference(x, cond_ref, noise, frame_mask, 0.0, flow_cfg.sigma_min)
    return x


Sampler = Callable[..., Tensor]
SAMPLERS: dict[str, Sampler] = {"euler": sample_euler}
"""Sampler name -> function; all share :func:`sample_euler`'s signature."""


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    model: MMDiT,
    noise: Tensor,
    text: TextEmbeddings,
    null_text: TextEmbeddings,
    opts: SamplingOptions,
    flow_cfg: RectifiedFlowConfig,
    cond_mask: Tensor | None = None,
    cond_ref: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run the sampler ``opts.sampler`` names; same arguments and result as :func:`sample_euler`."""
    return get_sampler(opts.sampler)(
        model, noise, text, null_text, opts, flow_cfg, cond_mask, cond_ref, generator
    )


def prepare_noise(
    seeds: list[int], latent_shape: tuple[int, int, int, int], device: torch.device | str = "cpu"
) -> Tensor:
    """Noise (B, C, T, H, W) float32, row i from its own CPU generator seeded ``seeds[i]``.

    Each row depends on its seed alone, so a sample is the same whether drawn alone or batched.
    """
    rows = [torch.randn(latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _expand_text(emb: TextEmbeddings, b: int) -> TextEmbeddings:
    """``emb`` with B rows: a batch of one is repeated, a batch of B kept."""
    if len(emb) == b:
        return emb
    if len(emb) != 1:
        raise ValueError(f"null_text must have 1 or {b} rows, got {len(emb)}")
    return TextEmbeddings(
        tokens=emb.tokens.expand(b, *emb.tokens.shape[1:]),
        mask=emb.mask.expand(b, *emb.mask.shape[1:]),
        pooled=emb.pooled.expand(b, *emb.pooled.shape[1:]),
    )


def _frame_mask(cond_mask: Tensor, like: Tensor) -> Tensor:
    """(B, 1, T, H, W) float mask from a (B, T) or (B, 1, T, H, W) one, on ``like``'s device."""
    b, _, t, h, w = like.shape
    m = cond_mask.to(device=like.device, dtype=torch.float32)
    if m.ndim == 2:
        m = m[:, None, :, None, None]
    return m.expand(b, 1, t, h, w)


def _hold_reference(
    x: Tensor, ref: Tensor, noise: Tensor, mask: Tensor, t: float, sigma_min: float
) -> Tensor:
    """x with its conditioned frames set to the reference's interpolation at time ``t``."""
    tt = torch.full((x.shape[0],), t, device=x.device)
    on_path = interpolate(ref.float().to(x.device), noise.float(), tt, sigma_min)
    return x * (1 - mask) + on_path * mask
