"""VAE training losses: L1 reconstruction, KL, optional LPIPS perceptual loss and a hinge GAN term.

``VaeLoss`` combines them and returns a dict of terms; the discriminator module is passed in by
the caller (so the training job can wrap it for data parallelism) and trained with
``VaeLoss.discriminator_loss``.

LPIPS (Zhang et al. 2018) compares unit-normalised VGG16 activations at five depths through
learned 1x1 "linear" heads. Nothing is downloaded: the weights come from a local safetensors file
holding ``features.N.weight/bias`` (torchvision's VGG16 ``features`` indices; other VGG keys such
as ``classifier.*`` are ignored) and ``heads.K.weight`` ``(1, C_K, 1, 1)``; heads named as in the
reference LPIPS release (``linK.model.1.weight``) are accepted too.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import load_file
from torch import nn

from opensora_core.errors import InputError
from opensora_core.models.vae.discriminator import adaptive_gan_weight, hinge_d_loss, hinge_g_loss

# VGG16 convolution widths, "M" = 2x2 max-pool; LPIPS reads the ReLU after the last conv of each stage.
_VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# Input normalisation of the LPIPS VGG variant, for images in [-1, 1].
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def l1_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements (a scalar)."""
    return (x - recon).abs().mean()


def mse_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel error (a scalar, computed in float32); shapes as :func:`l1_loss`."""
    return (x.float() - recon.float()).pow(2).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), averaged over all latent elements (a scalar)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 backbone: images ``(N, 3, H, W)`` in ``[-1, 1]`` -> ``(N,)``.

    Frozen: the parameters never require gradients and the module stays in eval mode, but
    gradients flow to the inputs. Load real weights with :meth:`from_file`.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        taps: list[int] = []
        in_ch = 3
        for spec in _VGG16_LAYERS:
            if spec == "M":
                taps.append(len(layers) - 1)  # the ReLU closing the stage
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, spec, 3, padding=1), nn.ReLU()]
                in_ch = spec
        taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.taps = tuple(taps)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """LPIPS with weights from a local safetensors file (see the module docstring for keys)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"LPIPS weights not found: {path}")
        model = cls()
        expected = set(model.state_dict())
        state = {}
        for key, value in load_file(str(path)).items():
            match = re.fullmatch(r"lin(\d)\.model\.1\.weight", key)
            key = f"heads.{match.group(1)}.weight" if match else key
            if key in expected:
                state[key] = value
        missing = sorted(expected - set(state))
        if missing:
            raise InputError(f"LPIPS weights {path} lack {len(missing)} tensors, e.g. {missing[:3]}")
        model.load_state_dict(state)
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per image: ``x``, ``y`` ``(N, 3, H, W)`` in ``[-1, 1]`` -> ``(N,)``."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        dist = x.new_zeros(x.shape[0])
        head_idx = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                fx, fy = h.chunk(2)
                fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                dist = dist + self.heads[head_idx]((fx - fy).pow(2)).mean(dim=(1, 2, 3))
                head_idx += 1
        return dist


def perceptual_loss(lpips: LPIPS, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Frame-wise LPIPS of videos ``(B, C, T, H, W)``, averaged over clips and frames (a scalar)."""
    frames_x = rearrange(x, "b c t h w -> (b t) c h w")
    frames_r = rearrange(recon, "b c t h w -> (b t) c h w")
    return lpips(frames_x, frames_r).mean()


class VaeLoss(nn.Module):
    """Generator and discriminator objectives of VAE training.

    generator: ``rec + kl_weight * kl [+ gan_weight * w_adapt * g_hinge]`` with the reconstruction
    term ``rec = l1 + mse_weight * mse + perceptual_weight * lpips``
    with the GAN term from step ``disc_start`` on; the discriminator is updated on steps
    ``disc_start, disc_start + disc_every, ...`` (see :meth:`should_update_discriminator`).

    Args:
        kl_weight: weight of the KL term (both L1 and KL are per-element means).
        mse_weight: weight of the pixel MSE added to L1 (0 = off).
        perceptual_weight: weight of frame-wise LPIPS; needs ``lpips`` when > 0.
        lpips: a loaded :class:`LPIPS`, or None (perceptual loss off).
        gan_weight: weight of the generator hinge loss, times the adaptive weight.
        disc_start: first step with a GAN term and discriminator updates.
        disc_every: discriminator update interval in steps.
        max_adaptive_weight: clamp of the adaptive weight.
    """

    def __init__(
        self,
        kl_weight: float = 1e-6,
        mse_weight: float = 0.0,
        perceptual_weight: float = 0.0,
        lpips: LPIPS | None = None,
        gan_weight: float = 0.5,
        disc_start: int = 0,
        disc_every: int = 1,
        max_adaptive_weight: float = 1e4,
    ) -> None:
        super().__init__()
        if perceptual_weight > 0 and lpips is None:
            raise ValueError("perceptual_weight > 0 needs LPIPS weights (lpips=LPIPS.from_file(path))")
        if disc_every < 1 or disc_start < 0:
            raise ValueError(f"disc_every must be >= 1 and disc_start >= 0, got {disc_every}, {disc_start}")
        self.kl_weight = kl_weight
        self.mse_weight = mse_weight
        self.perceptual_weight = perceptual_weight
        self.lpips = lpips
        self.gan_weight = gan_weight
        self.disc_start = disc_start
        self.disc_every = disc_every
        self.max_adaptive_weight = max_adaptive_weight

    def gan_active(self, step: int) -> bool:
        """Whether the generator loss includes the GAN term at ``step``."""
        return self.gan_weight > 0 and step >= self.disc_start

    def should_update_discriminator(self, step: int) -> bool:
        """Whether the discriminator takes an optimiser step at ``step``."""
        return self.gan_active(step) and (step - self.disc_start) % self.disc_every == 0

    def forward(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        *,
        step: int = 0,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generator loss terms.

        Args:
            x, recon: ``(B, C, T, H, W)`` in ``[-1, 1]``.
            mean, logvar: posterior ``(B, C', T', H', W')``.
            discriminator: scores ``recon`` for the GAN term (None = no GAN term).
            last_layer: decoder output weight for the adaptive weight; None uses weight 1.
        Returns:
            ``loss`` (to backpropagate) and the detached terms ``l1``, ``mse``, ``kl``,
            ``perceptual``, ``rec``, ``gan``, ``gan_weight``.
        """
        l1 = l1_loss(x, recon)
        mse = mse_loss(x, recon)
        kl = kl_loss(mean, logvar)
        perceptual = (
            perceptual_loss(self.lpips, x, recon)
            if self.lpips is not None and self.perceptual_weight > 0
            else None
        )
        rec = l1 + self.mse_weight * mse if self.mse_weight else l1
        if perceptual is not None:
            rec = rec + self.perceptual_weight * perceptual
        loss = rec + self.kl_weight * kl
        gan = torch.zeros((), device=x.device)
        weight = torch.zeros((), device=x.device)
        if discriminator is not None and self.gan_active(step):
            gan = hinge_g_loss(discriminator(recon))
            weight = torch.ones((), device=x.device)
            if last_layer is not None and torch.is_grad_enabled():
                weight = adaptive_gan_weight(rec, gan, last_layer, self.max_adaptive_weight)
            loss = loss + self.gan_weight * weight * gan
        zero = torch.zeros((), device=x.device)
        return {
            "loss": loss,
            "l1": l1.detach(),
            "mse": mse.detach(),
            "kl": kl.detach(),
            "perceptual": zero if perceptual is None else perceptual.detach(),
            "rec": rec.detach(),
            "gan": gan.detach(),
            "gan_weight": weight,
        }

    def discriminator_loss(
        self, discriminator: nn.Module, x: torch.Tensor, recon: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Hinge loss of ``discriminator`` on real ``x`` and (detached) ``recon`` ``(B, C, T, H, W)``.

        Returns ``d_loss`` (to backpropagate) and the mean logits ``logits_real``, ``logits_fake``.
        """
        logits_real = discriminator(x.detach())
        logits_fake = discriminator(recon.detach())
        return {
            "d_loss": hinge_d_loss(logits_real, logits_fake),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
