"""MMDiT (Open-Sora 2.0 / Flux): the multimodal diffusion transformer that denoises video latents.

Image tokens (patchified latents, plus an optional masked-reference condition) and text tokens are
embedded; double-stream blocks keep per-modality weights and attend jointly; single-stream blocks
run over the concatenated sequence; the last layer maps image tokens back to patch channels.
State-dict names and shapes match Open-Sora 2.0's released checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from opensora_core.errors import ConfigError
from opensora_core.models.mmdit.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStreamBlock,
    timestep_embedding,
)


@dataclass
class MMDiTConfig:
    in_channels: int = 32
    """Channels of one image token: latent channels * patch_size**2 (8 * 2 * 2 for the tiny VAE)."""
    out_channels: int | None = None
    """Channels the model predicts per token; None = ``in_channels``."""
    vec_in_dim: int = 384
    """Width of the pooled text vector ``y_vec`` (MiniLM: 384; Open-Sora 2.0's CLIP: 768)."""
    context_in_dim: int = 384
    """Width of the text token states ``txt`` (MiniLM: 384; Open-Sora 2.0's T5: 4096)."""
    hidden_size: int = 128
    """Transformer width."""
    mlp_ratio: float = 4.0
    """MLP hidden width / hidden_size."""
    num_heads: int = 4
    """Attention heads; the head dim is hidden_size / num_heads."""
    depth: int = 2
    """Number of double-stream blocks."""
    depth_single_blocks: int = 4
    """Number of single-stream blocks."""
    axes_dim: list[int] = field(default_factory=lambda: [8, 12, 12])
    """Rotary dims given to the (t, h, w) position axes; must sum to the head dim."""
    theta: int = 10_000
    """Rotary base period."""
    qkv_bias: bool = True
    """Bias on the double blocks' q/k/v projections."""
    guidance_embed: bool = False
    """Embed a guidance scale into ``vec`` (guidance-distilled models); adds ``guidance_in``."""
    cond_embed: bool = True
    """Add ``cond_in``: a zero-initialised embedding of the patchified (mask, masked reference latents)."""
    patch_size: int = 2
    """Spatial patch size (the temporal patch is 1); tokens hold in_channels / patch_size**2 latent channels."""
    checkpoint_blocks: int = 0
    """Recompute the first N blocks (double blocks first, then single) in backward; -1 = every block."""
    fused_qkv: bool = True
    """Run the projections that read the same input (q/k/v, single blocks' q/k/v+MLP) as one matmul."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"mmdit: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim or any(d % 2 for d in self.axes_dim):
            raise ConfigError(
                f"mmdit: axes_dim {self.axes_dim} must be even and sum to the head dim {head_dim}"
            )
        if self.in_channels % (self.patch_size**2):
            raise ConfigError(
                f"mmdit: in_channels {self.in_channels} is not a multiple of patch_size**2 ({self.patch_size**2})"
            )
        if self.checkpoint_blocks < -1:
            raise ConfigError(f"mmdit: checkpoint_blocks must be >= -1, got {self.checkpoint_blocks}")

    @property
    def latent_channels(self) -> int:
        """Latent channels C of the video the tokens were cut from."""
        return self.in_channels // self.patch_size**2


# Named sizes. `tiny` is the CPU default (MiniLM text states, 2.4M parameters); `small` is tiny
# twice as wide (9.2M: on the embedded default it follows held-out motion prompts better, for
# about 2.5x the diffusion training time; benchmarks/BENCHMARKS.md); `1B` is the size compared with
# Open-Sora 2.0's own code on GPU (its text and latent widths); `opensora-v2-11b` is the released model.
MMDIT_SIZES: dict[str, MMDiTConfig] = {
    "tiny": MMDiTConfig(),
    "small": MMDiTConfig(hidden_size=256, num_heads=8),
    # The tiny transformer on the 1B's inputs (16 latent channels, T5 4096 / CLIP 768 text widths):
    # runs the GPU profile's encoders and caches on CPU (benchmarks/gpu_suite.py fills its latent
    # cache with it; the cache key does not depend on the model).
    "tiny-1b-io": MMDiTConfig(in_channels=64, vec_in_dim=768, context_in_dim=4096),
    "1B": MMDiTConfig(
        in_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=1536,
        num_heads=12,
        depth=8,
        depth_single_blocks=16,
        axes_dim=[16, 56, 56],
    ),
    "opensora-v2-11b": MMDiTConfig(
        in_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        num_heads=24,
        depth=19,
        depth_single_blocks=38,
        axes_dim=[16, 56, 56],
    ),
}


def get_mmdit_config(size: str = "tiny", **overrides: object) -> MMDiTConfig:
    """The named size's config, with fields replaced by ``overrides`` (checked again)."""
    if size not in MMDIT_SIZES:
        raise ConfigError(f"unknown MMDiT size {size!r}; known sizes: {', '.join(MMDIT_SIZES)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MMDiTConfig)})
    if unknown:
        raise ConfigError(f"unknown MMDiT config field(s) {', '.join(unknown)}")
    return dataclasses.replace(MMDIT_SIZES[size], **overrides)


def build_mmdit(
    size: str | MMDiTConfig = "tiny", device: torch.device | str | None = None, **overrides: object
) -> MMDiT:
    """Build an MMDiT from a named size (or a config); ``device="meta"`` builds without memory."""
    if isinstance(size, MMDiTConfig):
        config = dataclasses.replace(size, **overrides) if overrides else size
    else:
        config = get_mmdit_config(size, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return MMDiT(config)


class MMDiT(nn.Module):
    """Transformer over [text, image] tokens conditioned on a vector of timestep and pooled text."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels or config.in_channels
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads

        self.pe_embedder = EmbedND(config.hidden_size // config.num_heads, config.theta, config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, config.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, config.hidden_size)
        self.vector_in = MLPEmbedder(config.vec_in_dim, config.hidden_size)
        self.guidance_in = MLPEmbedder(256, config.hidden_size) if config.guidance_embed else None
        # condition tokens: patchified [mask (1 channel), masked reference latents (C channels)]
        cond_dim = config.in_channels + config.patch_size**2
        self.cond_in = nn.Linear(cond_dim, config.hidden_size, bias=True) if config.cond_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, config.hidden_size)

        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(
                config.hidden_size, config.num_heads, config.mlp_ratio, config.qkv_bias, config.fused_qkv
            )
            for _ in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(config.hidden_size, config.num_heads, config.mlp_ratio, config.fused_qkv)
            for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(config.hidden_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every init decision of the model, in one place (used when training from scratch)."""
        # 1. Linear layers: Xavier-uniform weights, zero biases (DiT).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # 2. Vector embedders (timestep, guidance, pooled text): N(0, 0.02) (DiT's timestep MLP).
        for embedder in (self.time_in, self.vector_in, self.guidance_in):
            if embedder is not None:
                nn.init.normal_(embedder.in_layer.weight, std=0.02)
                nn.init.normal_(embedder.out_layer.weight, std=0.02)
        # 3. adaLN-Zero: zero modulation makes every block the identity and zero output layers
        #    make the prediction zero at step 0.
        for module in self.modules():
            if isinstance(module, Modulation):
                nn.init.zeros_(module.lin.weight)
                nn.init.zeros_(module.lin.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # 4. The condition embedding starts at zero, so adding it leaves the unconditioned model intact
        #    (Open-Sora 2.0 does the same when it adds cond_in to a text-to-video checkpoint).
        if self.cond_in is not None:
            nn.init.zeros_(self.cond_in.weight)
            nn.init.zeros_(self.cond_in.bias)
        # 5. RMSNorm scales stay at their constructor's ones.

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y_vec: Tensor,
        cond: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow (velocity) of each image token.

        img: (B, Li, in_channels) patchified latents; img_ids: (B, Li, 3) (t, h, w) positions;
        txt: (B, Lt, context_in_dim) text states; txt_ids: (B, Lt, 3) positions (zeros);
        timesteps: (B,) in [0, 1]; y_vec: (B, vec_in_dim) pooled text;
        cond: (B, Li, in_channels + patch_size**2) patchified [mask, masked reference] or None
        (no reference: the same as an all-zero condition); guidance: (B,) when ``guidance_embed``.
        Returns (B, Li, out_channels) in the model's dtype.
        """
        dtype = self.img_in.weight.dtype
        # 1. embed: image tokens (+ reference condition), text tokens, the conditioning vector, positions
        img = self.img_in(img.to(dtype))
        if self.cond_in is not None:
            img = img + (self.cond_in(cond.to(dtype)) if cond is not None else self.cond_in.bias)
        elif cond is not None:
            raise ValueError("cond was given but the model has no cond_in (config.cond_embed is False)")
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model embeds guidance (config.guidance_embed): pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y_vec.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        # 2. double-stream blocks: separate weights per modality, joint attention
        for i, block in enumerate(self.double_blocks):
            img, txt = self._maybe_checkpoint(i, block, img, txt, vec, pe)

        # 3. single-stream blocks over the joint [txt, img] sequence
        x = torch.cat((txt, img), dim=1)
        for j, block in enumerate(self.single_blocks):
            x = self._maybe_checkpoint(len(self.double_blocks) + j, block, x, vec, pe)
        img = x[:, txt.shape[1] :]

        # 4. last layer: adaLN, then back to patch channels
        return self.final_layer(img, vec)

    def _maybe_checkpoint(
        self, index: int, block: nn.Module, *args: Tensor
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Run block ``index``; recompute it in backward if it is among the first ``checkpoint_blocks``."""
        n = self.config.checkpoint_blocks
        if (n == -1 or index < n) and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
