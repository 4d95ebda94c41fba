"""Rectified flow: timestep sampling, the time shift, the noisy interpolation, target and loss.

Convention: t = 0 is data, t = 1 is noise.

    x_t = (1 - (1 - sigma_min) t) x0 + t noise          (sigma_min = 0: the straight line)
    v   = dx_t/dt = noise - (1 - sigma_min) x0           (the model's regression target)

Training times are logit-normal (Esser et al. 2024, SD3): t = sigmoid(u), u ~ N(mean, std),
then shifted towards noise for larger inputs. The shift is the SD3 / Open-Sora 1.2 map

    t' = s t / (1 + (s - 1) t),    s = scale * sqrt(num_tokens / base_tokens) * sqrt(num_frames / base_frames)

with ``num_tokens`` the spatial tokens per latent frame the model sees and ``num_frames`` the
latent frames: more tokens carry more redundant signal, so more noise is needed to destroy it.
The map fixes 0 and 1, is increasing, and sends t = 1/2 to s / (1 + s). The sampler's schedule
(:func:`get_schedule`) uses the same map, so training and sampling agree on where the time is
spent.
"""

from __future__ import annotations

import math

import torch

from opensora_core.config import RectifiedFlowConfig


# --------------------------------------------------------------------------------------------
# Time shift and schedule
# --------------------------------------------------------------------------------------------
def compute_shift(
    num_tokens: int, num_frames: int, *, base_tokens: int = 256, base_frames: int = 1, scale: float = 1.0
) -> float:
    """The shift s = scale * sqrt(num_tokens / base_tokens) * sqrt(num_frames / base_frames)."""
    if num_tokens < 1 or num_frames < 1:
        raise ValueError(f"num_tokens and num_frames must be >= 1, got {num_tokens}, {num_frames}")
    return scale * math.sqrt(num_tokens / base_tokens) * math.sqrt(num_frames / base_frames)


def time_shift(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t) elementwise; ``shift`` a float or broadcastable to ``t``."""
    return shift * t / (1 + (shift - 1) * t)


def get_schedule(
    num_steps: int,
    num_tokens: int,
    num_frames: int,
    *,
    base_tokens: int = 256,
    base_frames: int = 1,
    scale: float = 1.0,
    shift: bool = True,
) -> torch.Tensor:
    """Sampling times (num_steps + 1,), float32, from 1 (noise) down to 0 (data).

    Uniform steps in t, mapped through :func:`time_shift` with :func:`compute_shift`'s s when
    ``shift`` is on; the Euler sampler steps from ``ts[i]`` to ``ts[i + 1]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if shift:
        s = compute_shift(
            num_tokens, num_frames, base_tokens=base_tokens, base_frames=base_frames, scale=scale
        )
        ts = time_shift(ts, s)
    return ts.float()


# --------------------------------------------------------------------------------------------
# Training: times, inputs, target, loss
# --------------------------------------------------------------------------------------------
def sample_timesteps(
    batch_size: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times (B,) in (0, 1): sigmoid of N(logit_mean, logit_std^2), then shifted by ``shift``.

    Drawn on the generator's device (CPU when None) and moved to ``device``.
    """
    gen_device = generator.device if generator is not None else None
    u = torch.randn(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
    t = torch.sigmoid(logit_mean + logit_std * u)
    if shift != 1.0:
        t = time_shift(t, shift)
    # Keep t strictly inside (0, 1) in float32 as well.
    eps = 1e-6
    return t.clamp(eps, 1 - eps).float().to(device)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with the rank and dtype of ``like``."""
    return t.to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float = 0.0
) -> torch.Tensor:
    """x_t = (1 - (1 - sigma_min) t) x0 + t noise.  x0, noise: (B, ...); t: (B,). Returns (B, ...)."""
    tt = _expand(t, x0)
    return (1 - (1 - sigma_min) * tt) * x0 + tt * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor, sigma_min: float = 0.0) -> torch.Tensor:
    """The velocity dx_t/dt = noise - (1 - sigma_min) x0, shape of x0."""
    return noise - (1 - sigma_min) * x0


def flow_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample masked MSE (B,), computed in float32.

    pred, target: (B, C, T, H, W) (or any (B, ...)). loss_mask: (B, T) for 5-D inputs, 1 on the
    latent frames that count and 0 on conditioned ones, or any shape broadcastable to pred;
    None counts everything. Each sample is normalised by its count of unmasked elements, so a
    sample with conditioned frames is not down-weighted; a sample with none left gives 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    err = (pred.float() - target.float()).square()
    if loss_mask is None:
        return err.flatten(1).mean(dim=1)
    m = loss_mask.to(device=err.device, dtype=err.dtype)
    if pred.ndim == 5 and m.ndim == 2:
        m = m[:, None, :, None, None]
    m = m.broadcast_to(err.shape)
    count = m.flatten(1).sum(dim=1)
    return (err * m).flatten(1).sum(dim=1) / count.clamp(min=1)


def timestep_bins(t: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index (B,) long of each t in [0, 1]: bin k holds [k / n_bins, (k + 1) / n_bins), t = 1 in the last."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return (t.float() * n_bins).floor().long().clamp(0, n_bins - 1)


def loss_by_bin(loss: torch.Tensor, t: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums (n_bins,) float and counts (n_bins,) long of per-sample ``loss`` (B,) by the bin of ``t`` (B,).

    Sums and counts (rather than means) so they can be added across steps and ranks.
    """
    bins = timestep_bins(t, n_bins).to(loss.device)
    sums = torch.zeros(n_bins, dtype=torch.float32, device=loss.device).index_add_(
        0, bins, loss.detach().float()
    )
    counts = torch.bincount(bins, minlength=n_bins)
    return sums, counts


class RectifiedFlow:
    """The options of a :class:`RectifiedFlowConfig` bound to the functions of this module."""

    def __init__(self, cfg: RectifiedFlowConfig | None = None) -> None:
        self.cfg = cfg or RectifiedFlowConfig()

    def shift(self, num_tokens: int, num_frames: int) -> float:
        """The time shift s for latents of ``num_tokens`` spatial tokens and ``num_frames`` frames (1 if off)."""
        if not self.cfg.use_shift:
            return 1.0
        c = self.cfg
        return compute_shift(
            num_tokens, num_frames, base_tokens=c.base_tokens, base_frames=c.base_frames, scale=c.shift_scale
        )

    def sample_t(
        self,
        batch_size: int,
        num_tokens: int,
        num_frames: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Training times (B,) for a batch of latents of one shape."""
        return sample_timesteps(
            batch_size,
            logit_mean=self.cfg.logit_mean,
            logit_std=self.cfg.logit_std,
            shift=self.shift(num_tokens, num_frames),
            generator=generator,
            device=device,
        )

    def prepare_inputs(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy latents x_t and the velocity target, both shaped like x0 (B, C, T, H, W)."""
        sm = self.cfg.sigma_min
        return interpolate(x0, noise, t, sm), velocity_target(x0, noise, sm)

    def loss(
        self, pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sample loss (B,); see :func:`flow_loss`."""
        return flow_loss(pred, target, loss_mask)

    def schedule(self, num_steps: int, num_tokens: int, num_frames: int) -> torch.Tensor:
        """Sampling times (num_steps + 1,) from 1 to 0; see :func:`get_schedule`."""
        c = self.cfg
        return get_schedule(
            num_steps,
            num_tokens,
            num_frames,
            base_tokens=c.base_tokens,
            base_frames=c.base_frames,
            scale=c.shift_scale,
            shift=c.use_shift,
        )
