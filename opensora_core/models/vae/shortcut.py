"""A non-parametric residual path between pixels and latents (residual autoencoding).

Deep-compression autoencoders learn slowly when every latent must be discovered by the network:
DC-AE (Chen et al., 2024, "Deep Compression Autoencoder for Efficient High-Resolution Diffusion
Models"; Open-Sora 2.0's Video DC-AE builds on it) adds parameter-free space-to-channel shortcuts,
so the network learns a residual on top of a fixed downsampling. This module is that idea at the
bottleneck of a causal video VAE with temporal factor ``tf`` and spatial factor ``sf``:

- :meth:`LatentShortcut.down` cuts each latent cell (``tf`` frames of ``sf x sf`` pixels; the
  first latent frame holds frame 0 alone, as in the causal VAEs) into ``g`` consecutive temporal
  windows and returns the RGB mean of each: ``(B, 3, T, H, W) -> (B, 3g, T', H', W')``, channels
  ordered window-major ``[w0 R, w0 G, w0 B, w1 R, ...]``;
- :meth:`LatentShortcut.up` is its smooth inverse: the window means placed at their times and
  upsampled trilinearly, ``(B, >=3g, T', H', W') -> (B, 3, T, H, W)``.

``g`` is the largest divisor of ``tf`` with ``3g <= latent channels`` (2 for 8 channels and 4x
time, 4 for 16). :class:`~opensora_core.models.vae.model.VideoAutoencoder` adds ``down(x)`` to the
first ``3g`` channels of the posterior mean and ``up(z)`` to the decoder's output; with the
decoder's output convolution zero-initialised, an untrained model already returns the blurred
video and training only has to learn the detail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shortcut_windows(temporal_factor: int, latent_channels: int) -> int:
    """Temporal windows per latent cell: the largest divisor of ``temporal_factor`` with
    ``3 * g <= latent_channels``; ValueError below 3 channels."""
    if latent_channels < 3:
        raise ValueError(f"a latent shortcut needs >= 3 latent channels, got {latent_channels}")
    return max(g for g in range(1, temporal_factor + 1) if temporal_factor % g == 0 and 3 * g <= latent_channels)


class LatentShortcut:
    """Fixed pixel <-> latent mapping of one VAE geometry (no parameters, no state)."""

    def __init__(self, spatial_factor: int, temporal_factor: int, latent_channels: int) -> None:
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.windows = shortcut_windows(temporal_factor, latent_channels)
        self.channels = 3 * self.windows
        """Latent channels the shortcut writes and reads (the first ones)."""

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """Window means ``(B, 3g, T', H', W')`` of a video ``(B, 3, T, H, W)`` with ``T = k * tf + 1``."""
        tf, sf, g = self.temporal_factor, self.spatial_factor, self.windows
        if tf > 1:  # frame 0 stands alone: repeat it to a whole cell
            x = torch.cat([x[:, :, :1].expand(-1, -1, tf - 1, -1, -1), x], dim=2)
        z = F.avg_pool3d(x, (tf // g, sf, sf))  # (B, 3, T' * g, H', W')
        b, c, tg, h, w = z.shape
        z = z.view(b, c, tg // g, g, h, w).permute(0, 3, 1, 2, 4, 5)
        return z.reshape(b, g * c, tg // g, h, w)

    def up(self, z: torch.Tensor) -> torch.Tensor:
        """Video ``(B, 3, T, H, W)``, ``T = (T' - 1) * tf + 1``, from the first ``3g`` channels of
        latents ``(B, C', T', H', W')``."""
        tf, sf, g = self.temporal_factor, self.spatial_factor, self.windows
        b, _, t, h, w = z.shape
        y = z[:, : self.channels].reshape(b, g, 3, t, h, w).permute(0, 2, 3, 1, 4, 5)
        y = y.reshape(b, 3, t * g, h, w)
        y = F.interpolate(y, size=(t * tf, h * sf, w * sf), mode="trilinear", align_corners=False)
        return y[:, :, tf - 1 :]

    def add_to_latents(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``latents (B, C', T', H', W')`` with :meth:`down` of ``x`` added to the first ``3g`` channels."""
        down = self.down(x).to(latents.dtype)
        return torch.cat([latents[:, : self.channels] + down, latents[:, self.channels :]], dim=1)
