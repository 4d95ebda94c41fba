"""Video autoencoder (diffusers Wan / HunyuanVideo VAEs), its training losses and discriminator."""

from opensora_core.models.vae.discriminator import (
    PatchDiscriminator3D,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from opensora_core.models.vae.losses import LPIPS, VaeLoss, kl_loss, l1_loss, mse_loss, perceptual_loss
from opensora_core.models.vae.model import (
    FAMILIES,
    VAE_SIZES,
    VaeModelConfig,
    VideoAutoencoder,
    build_vae,
    get_vae_config,
)

__all__ = [
    "FAMILIES",
    "LPIPS",
    "VAE_SIZES",
    "PatchDiscriminator3D",
    "VaeLoss",
    "VaeModelConfig",
    "VideoAutoencoder",
    "adaptive_gan_weight",
    "build_vae",
    "get_vae_config",
    "hinge_d_loss",
    "hinge_g_loss",
    "kl_loss",
    "l1_loss",
    "mse_loss",
    "perceptual_loss",
]
