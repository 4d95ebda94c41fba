"""Video autoencoder: diffusers' causal 3D VAEs (Wan, HunyuanVideo) behind one wrapper.

The architectures come from diffusers (``AutoencoderKLWan``, ``AutoencoderKLHunyuanVideo``); this
module names their sizes, builds them from config dicts (never downloaded), optionally initialises
them from a local diffusers-format folder, and wraps them in :class:`VideoAutoencoder`, which adds
the latent statistics that make latents roughly zero-mean, unit-variance for the diffusion model:

    encode(x) = ((z - mean_c) / std_c - shift) * scale        z = posterior mean (or a sample)
    decode(e) = decode_raw((e / scale + shift) * std_c + mean_c)

``mean_c``/``std_c`` are per latent channel, ``scale``/``shift`` scalars (Open-Sora's
``scaling_factor``/``shift_factor``); all four are identity until :meth:`set_latent_stats`.

Videos are ``(B, C, T, H, W)`` in ``[-1, 1]`` with ``T = 1`` (a still) or ``T = k * t + 1``
(``t`` the temporal factor); ``H`` and ``W`` are multiples of the spatial factor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file
from torch import nn

from opensora_core.errors import ConfigError, InputError
from opensora_core.models.vae.shortcut import LatentShortcut

FAMILIES: dict[str, type[nn.Module]] = {"wan": AutoencoderKLWan, "hunyuan": AutoencoderKLHunyuanVideo}
"""Family name -> diffusers model class."""

VAE_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "wan": {
        # 4x temporal, 8x spatial, 8 channels, ~0.65M parameters: the CPU default and the test model.
        "tiny": {
            "base_dim": 8,
            "z_dim": 8,
            "dim_mult": [1, 2, 4, 4],
            "num_res_blocks": 1,
            "temperal_downsample": [False, True, True],
            "latents_mean": [0.0] * 8,
            "latents_std": [1.0] * 8,
            "scale_factor_temporal": 4,
            "scale_factor_spatial": 8,
        },
        # 4x temporal, 4x spatial, 8 channels, ~0.47M parameters: tiny without its last level. A 48 px
        # frame is 12x12 latents (6x6 MMDiT tokens at patch 2), so a 12-19 px shape spans several
        # tokens; it keeps more of a shape's outline than tiny (benchmarks/BENCHMARKS.md, "Geometry").
        "tiny-s4": {
            "base_dim": 8,
            "z_dim": 8,
            "dim_mult": [1, 2, 4],
            "num_res_blocks": 1,
            "temperal_downsample": [True, True],
            "latents_mean": [0.0] * 8,
            "latents_std": [1.0] * 8,
            "scale_factor_temporal": 4,
            "scale_factor_spatial": 4,
        },
        # AutoencoderKLWan's defaults: the released Wan 2.1 VAE (4x8x8, 16 channels, ~127M parameters).
        "wan2.1": {},
    },
    "hunyuan": {
        # 4x temporal, 8x spatial, 8 channels, ~0.73M parameters.
        "tiny": {
            "latent_channels": 8,
            "block_out_channels": [8, 16, 32, 32],
            "layers_per_block": 1,
            "norm_num_groups": 8,
        },
        # AutoencoderKLHunyuanVideo's defaults: the released HunyuanVideo VAE (4x8x8, 16 channels, ~246M).
        "hunyuan": {},
    },
}
"""Family -> size name -> keyword arguments of the family's diffusers class."""


@dataclass
class VaeModelConfig:
    family: str = "wan"
    """diffusers architecture: ``wan`` (AutoencoderKLWan) or ``hunyuan`` (AutoencoderKLHunyuanVideo)."""
    size: str = "tiny"
    """Named size in VAE_SIZES[family]: ``tiny`` (CPU default, < 1M parameters) or the released
    config (``wan2.1`` for wan, ``hunyuan`` for hunyuan), built from its config dict, never downloaded."""
    pretrained_path: str = ""
    """A local folder in diffusers format (``config.json`` + weights) to initialise from, for
    fine-tuning; its architecture replaces the size's. Empty = random initialisation."""
    shortcut: bool = False
    """Add the parameter-free latent shortcut (see :mod:`~opensora_core.models.vae.shortcut`) and
    zero-initialise the decoder's output convolution, so the network learns a residual over a
    blurred copy of the video. For training from scratch; a pretrained VAE was trained without it."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"vae family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.size not in VAE_SIZES[self.family]:
            sizes = ", ".join(VAE_SIZES[self.family])
            raise ConfigError(f"vae size {self.size!r} is not a {self.family} size; known: {sizes}")
        if self.shortcut and self.pretrained_path:
            raise ConfigError(
                "the latent shortcut is for training from scratch: a pretrained VAE "
                f"({self.pretrained_path}) was trained without it"
            )


def get_vae_config(family: str, size: str) -> dict[str, Any]:
    """The keyword arguments that build the named size (a copy; ``{}`` means the class defaults)."""
    VaeModelConfig(family=family, size=size)  # validates both names
    return json.loads(json.dumps(VAE_SIZES[family][size]))


def build_vae(cfg: VaeModelConfig) -> VideoAutoencoder:
    """Build the autoencoder ``cfg`` names: from a local pretrained folder, else randomly initialised."""
    model_cls = FAMILIES[cfg.family]
    if cfg.pretrained_path:
        path = Path(cfg.pretrained_path)
        if not (path / "config.json").is_file():
            raise InputError(f"pretrained VAE folder {path} has no config.json (expected diffusers format)")
        vae = model_cls.from_pretrained(path, local_files_only=True)
    else:
        vae = model_cls(**get_vae_config(cfg.family, cfg.size))
    model = VideoAutoencoder(vae, cfg)
    if cfg.shortcut:
        # The learned paths start at zero: the posterior mean is the shortcut's window means and
        # the untrained model returns the shortcut's blurred video.
        with torch.no_grad():
            mean_rows = vae.quant_conv.weight.shape[0] // 2  # quant_conv emits [mean, logvar]
            vae.quant_conv.weight[:mean_rows] = 0.0
            vae.quant_conv.bias[:mean_rows] = 0.0
            model.last_layer.weight.zero_()
            model.last_layer.bias.zero_()
    return model


class VideoAutoencoder(nn.Module):
    """A diffusers video VAE plus latent statistics, with shape checks and save/load.

    Buffers ``latent_mean``/``latent_std`` ``(C,)`` and ``latent_scale``/``latent_shift`` ``()``
    hold the statistics; they are part of the state dict, so checkpoints carry them.
    """

    def __init__(self, vae: nn.Module, config: VaeModelConfig) -> None:
        super().__init__()
        self.vae = vae
        self.config = config
        if config.family == "hunyuan":
            # Its frame-wise path splits clips longer than 16 frames into overlapping, blended
            # windows; training and inference here see the whole clip at once.
            vae.use_framewise_encoding = False
            vae.use_framewise_decoding = False
        channels = self.latent_channels
        self.shortcut = (
            LatentShortcut(self.spatial_factor, self.temporal_factor, channels) if config.shortcut else None
        )
        self.register_buffer("latent_mean", torch.zeros(channels))
        self.register_buffer("latent_std", torch.ones(channels))
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.register_buffer("latent_shift", torch.tensor(0.0))

    # ---- geometry ------------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along H and W."""
        cfg = self.vae.config
        if self.config.family == "wan":
            return 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
        return int(cfg.spatial_compression_ratio)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (causal: T frames -> (T - 1) / factor + 1)."""
        cfg = self.vae.config
        if self.config.family == "wan":
            return 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        return int(cfg.temporal_compression_ratio)

    @property
    def latent_channels(self) -> int:
        cfg = self.vae.config
        return int(cfg.z_dim if self.config.family == "wan" else cfg.latent_channels)

    @property
    def last_layer(self) -> nn.Conv3d:
        """The decoder's output convolution."""
        conv = self.vae.decoder.conv_out
        return conv if isinstance(conv, nn.Conv3d) else conv.conv

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """Weight of the decoder's output convolution (for the adaptive GAN weight)."""
        return self.last_layer.weight

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of the latents of a ``(T, H, W)`` clip; raises ValueError if not encodable."""
        self._check_video_shape(num_frames, height, width)
        sf, tf = self.spatial_factor, self.temporal_factor
        return (self.latent_channels, (num_frames - 1) // tf + 1, height // sf, width // sf)

    def _check_video_shape(self, num_frames: int, height: int, width: int) -> None:
        sf, tf = self.spatial_factor, self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % tf:
            raise ValueError(f"number of frames must be 1 or {tf}k+1, got {num_frames}")
        if height % sf or width % sf or height < sf or width < sf:
            raise ValueError(f"height and width must be positive multiples of {sf}, got {height}x{width}")

    def _check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"expected a video batch (B, C, T, H, W), got shape {tuple(x.shape)}")
        self._check_video_shape(*x.shape[2:])

    # ---- training ------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """The diagonal Gaussian posterior q(z | x) of ``x`` ``(B, C, T, H, W)`` (its mean includes
        the latent shortcut when the model has one)."""
        self._check_video(x)
        posterior = self.vae.encode(x).latent_dist
        if self.shortcut is None:
            return posterior
        mean = self.shortcut.add_to_latents(posterior.mean, x)
        return DiagonalGaussianDistribution(torch.cat([mean, posterior.logvar], dim=1))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output ``(B, C, T, H, W)`` (unclamped), plus the shortcut's when present."""
        out = self.vae.decode(z).sample
        return out if self.shortcut is None else out + self.shortcut.up(z).to(out.dtype)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct ``x`` through a posterior sample (or its mean).

        Args:
            x: ``(B, C, T, H, W)`` in ``[-1, 1]``.
        Returns:
            recon ``(B, C, T, H, W)``, posterior mean and log-variance ``(B, C', T', H', W')``.
        """
        posterior = self.posterior(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        recon = self._decode(z)
        return recon, posterior.mean, posterior.logvar

    # ---- inference -----------------------------------------------------------------------
    def encode_raw(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Unscaled latents ``(B, C', T', H', W')`` of ``x`` ``(B, C, T, H, W)``: the posterior mean."""
        posterior = self.posterior(x)
        return posterior.sample() if sample else posterior.mode()

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Latents ``(B, C', T', H', W')`` with the latent statistics applied (see module docstring)."""
        return self.normalize_latents(self.encode_raw(x, sample=sample))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Video ``(B, C, T, H, W)`` in ``[-1, 1]`` from unscaled latents ``(B, C', T', H', W')``."""
        return self._decode(z).clamp(-1.0, 1.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Video ``(B, C, T, H, W)`` in ``[-1, 1]`` from latents made by :meth:`encode`."""
        return self.decode_raw(self.denormalize_latents(z))

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``((z - mean_c) / std_c - shift) * scale`` on ``(B, C', ...)``."""
        shape = (1, -1) + (1,) * (z.ndim - 2)
        z = (z - self.latent_mean.view(shape)) / self.latent_std.view(shape)
        return (z - self.latent_shift) * self.latent_scale

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_latents`."""
        shape = (1, -1) + (1,) * (z.ndim - 2)
        z = z / self.latent_scale + self.latent_shift
        return z * self.latent_std.view(shape) + self.latent_mean.view(shape)

    # ---- latent statistics ---------------------------------------------------------------
    def set_latent_stats(self, stats: dict[str, Any]) -> None:
        """Apply measured statistics: ``mean``, ``std`` (one float per channel), optional ``scale``
        (default 1) and ``shift`` (default 0); other keys (``num_samples``, ...) are ignored."""
        channels = self.latent_channels
        mean = torch.as_tensor(stats["mean"], dtype=torch.float32).flatten()
        std = torch.as_tensor(stats["std"], dtype=torch.float32).flatten()
        scale = float(stats.get("scale", 1.0))
        shift = float(stats.get("shift", 0.0))
        if mean.numel() != channels or std.numel() != channels:
            raise ConfigError(
                f"latent stats have {mean.numel()} means and {std.numel()} stds; the VAE has {channels} channels"
            )
        if not (torch.all(std > 0) and torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ConfigError("latent stats: std must be positive and all values finite")
        if not (scale > 0 and torch.isfinite(torch.tensor(shift))):
            raise ConfigError(f"latent stats: scale must be positive and shift finite, got {scale}, {shift}")
        with torch.no_grad():
            self.latent_mean.copy_(mean)
            self.latent_std.copy_(std)
            self.latent_scale.fill_(scale)
            self.latent_shift.fill_(shift)

    def get_latent_stats(self) -> dict[str, Any]:
        """The statistics in use, in the ``set_latent_stats`` format."""
        return {
            "mean": self.latent_mean.tolist(),
            "std": self.latent_std.tolist(),
            "scale": float(self.latent_scale),
            "shift": float(self.latent_shift),
        }

    # ---- persistence ---------------------------------------------------------------------
    def save(self, directory: str | Path, name: str = "model") -> Path:
        """Write ``{name}.safetensors`` (state dict, statistics included) and ``{name}.json``
        (the VaeModelConfig and the diffusers config that rebuilds the architecture)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / f"{name}.safetensors"))
        arch = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        meta = {"model": dataclasses.asdict(self.config), "diffusers_config": arch}
        (directory / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory / f"{name}.safetensors"

    @classmethod
    def load(cls, directory: str | Path, name: str = "model") -> VideoAutoencoder:
        """Rebuild a model written by :meth:`save` (on CPU)."""
        directory = Path(directory)
        weights, meta_path = directory / f"{name}.safetensors", directory / f"{name}.json"
        for path in (weights, meta_path):
            if not path.is_file():
                raise InputError(f"VAE checkpoint file not found: {path}")
        meta = json.loads(meta_path.read_text())
        config = VaeModelConfig(**meta["model"])
        model = cls(FAMILIES[config.family](**meta["diffusers_config"]), config)
        model.load_state_dict(load_file(str(weights)))
        return model
