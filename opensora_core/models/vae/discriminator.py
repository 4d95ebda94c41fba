"""3D PatchGAN discriminator for video VAEs, hinge losses and the adaptive generator weight.

The discriminator scores overlapping space-time patches of ``(B, C, T, H, W)`` clips: a stack of
strided Conv3d -> GroupNorm -> LeakyReLU blocks (PatchGAN, Isola et al. 2017, in 3D). The
adaptive weight balances the GAN term against the reconstruction term by the ratio of their
gradient norms at the decoder's last layer (Esser et al. 2021, "Taming Transformers").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Temporal kernel 3 with padding 1 keeps one-frame stills at T = 1; spatial kernel 4 as in PatchGAN.
_KERNEL = (3, 4, 4)
_PADDING = (1, 1, 1)


class PatchDiscriminator3D(nn.Module):
    """Video PatchGAN: ``(B, C, T, H, W)`` -> patch logits ``(B, 1, T', H', W')``.

    Args:
        in_channels: channels of the clips (3 for RGB).
        base_channels: width of the first block; each further block doubles it (capped at 8x).
        num_layers: strided blocks after the first (each halves T, H and W).
        norm_groups: GroupNorm groups (batch-independent, so it behaves the same under DDP).
    """

    def __init__(
        self, in_channels: int = 3, base_channels: int = 32, num_layers: int = 2, norm_groups: int = 8
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, base_channels, _KERNEL, stride=2, padding=_PADDING),
            nn.LeakyReLU(0.2),
        ]
        channels = base_channels
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            out = base_channels * min(2**i, 8)
            layers += [
                nn.Conv3d(channels, out, _KERNEL, stride=stride, padding=_PADDING, bias=False),
                nn.GroupNorm(min(norm_groups, out), out),
                nn.LeakyReLU(0.2),
            ]
            channels = out
        layers.append(nn.Conv3d(channels, 1, _KERNEL, stride=1, padding=_PADDING))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DCGAN init: conv weights ~ N(0, 0.02), norm scale 1 and bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, T, H, W)`` in ``[-1, 1]`` -> logits ``(B, 1, T', H', W')``."""
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``(mean relu(1 - real) + mean relu(1 + fake)) / 2`` (a scalar)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss ``-mean(fake)`` (a scalar)."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``|grad rec_loss| / (|grad gan_loss| + eps)`` at ``last_layer``, clamped to ``[0, max_weight]``.

    Both losses must still have their graphs (they are kept for the caller's backward). The result
    is detached: a scalar that scales the GAN term, not something to differentiate.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
