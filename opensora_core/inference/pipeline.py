"""The text-to-video pipeline object: VAE (with latent statistics) + MMDiT + text encoder + flow
config + video defaults, built from training outputs or a bundle, and its ``generate``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from opensora_core.diffusion.conditions import CONDITION_TYPES, build_conditions
from opensora_core.diffusion.rectified_flow import RectifiedFlowConfig
from opensora_core.diffusion.sampling import SamplingOptions, prepare_noise, sample
from opensora_core.errors import ConfigError, InputError
from opensora_core.inference.adapters import load_bundle_mmdit, merge_adapter_into, write_adapter_bundle
from opensora_core.inference.run_config import find_flow_config, find_v2v_frames, text_encoder_config
from opensora_core.inference.sources import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    ModelSource,
    _client,
    download_bundle,
    resolve_model,
)
from opensora_core.inference.video import VideoSpec, default_video_spec, prepare_reference, to_uint8
from opensora_core.models.final import (
    dataclass_from,
    load_latent_stats,
    load_mmdit_final,
    load_vae_dir,
    read_json,
)
from opensora_core.models.mmdit.model import MMDiT
from opensora_core.models.text.encoders import (
    TextEmbeddings,
    TextEncoder,
    TextEncoderConfig,
    build_text_encoder_from_config,
)
from opensora_core.models.vae.model import VideoAutoencoder

log = logging.getLogger("opensora.inference")

DEFAULT_VAE_DIR = "models/vae/final"
DEFAULT_LATENT_STATS = "models/vae/latent_stats.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


class T2VPipeline:
    """VAE (with latent statistics) + MMDiT + text encoder + flow config + video defaults."""

    def __init__(
        self,
        vae: VideoAutoencoder,
        mmdit: MMDiT,
        text_encoder: TextEncoder,
        text_config: TextEncoderConfig,
        flow: RectifiedFlowConfig,
        video: VideoSpec,
        *,
        config: Mapping[str, Any] | None = None,
        v2v_frames: int = 0,
        device: str | torch.device | None = None,
        dtype: str = "float32",
        offload: bool = False,
    ) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu" and dtype == "float16":
            raise ConfigError("float16 is not supported on CPU; use float32 or bfloat16")
        self.vae = vae.eval()
        self.mmdit = mmdit.eval().to(DTYPES[dtype])
        self.text_encoder = text_encoder
        self.text_config = text_config
        self.flow = flow
        self.video = video
        self.config = dict(config or {})
        self.v2v_frames = v2v_frames
        self.dtype = dtype
        self.offload = offload and self.device.type != "cpu"
        if not self.offload:
            for module in (self.vae, self.mmdit):
                module.to(self.device)
            self.text_encoder.to(self.device)

    # ---- construction --------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        """Pixels per token side: VAE factor x patch size; video sides are multiples of it."""
        return self.vae.spatial_factor * self.mmdit.config.patch_size

    @classmethod
    def from_training(
        cls,
        diffusion_dir: str | Path,
        vae_dir: str | Path = DEFAULT_VAE_DIR,
        latent_stats: str | Path = DEFAULT_LATENT_STATS,
        *,
        use_ema: bool = True,
        fps: float = 8.0,
        **kwargs: Any,
    ) -> T2VPipeline:
        """From a diffusion stage's ``final/`` folder, the VAE's ``final/`` and its latent statistics."""
        diffusion_dir = Path(diffusion_dir)
        for path in (diffusion_dir / "mmdit_config.json", Path(latent_stats)):
            if not path.is_file():
                raise InputError(f"not found: {path}")
        config = read_json(diffusion_dir / "config.json") if (diffusion_dir / "config.json").is_file() else {}
        vae = load_vae_dir(vae_dir)
        vae.set_latent_stats(load_latent_stats(latent_stats))
        mmdit = load_mmdit_final(diffusion_dir, use_ema=use_ema)
        text_config = text_encoder_config(diffusion_dir / "text_encoder.json", config)
        spec = default_video_spec(config, vae.spatial_factor * mmdit.config.patch_size, fps)
        return cls(
            vae,
            mmdit,
            build_text_encoder_from_config(text_config),
            text_config,
            find_flow_config(config),
            spec,
            config=config,
            v2v_frames=find_v2v_frames(config),
            **kwargs,
        )

    @classmethod
    def from_bundle(cls, path: str | Path, *, tracking_uri: str | None = None, **kwargs: Any) -> T2VPipeline:
        """From a bundle folder written by :meth:`save_bundle` (an adapter bundle loads its base
        from the registry at ``tracking_uri`` and merges the adapter)."""
        path = Path(path)
        meta = read_json(path / BUNDLE_FILE)
        if meta.get("format") != BUNDLE_FORMAT:
            raise InputError(f"{path / BUNDLE_FILE}: unknown format {meta.get('format')!r}")
        vae = VideoAutoencoder.load(path, "vae")
        mmdit = load_bundle_mmdit(path, tracking_uri)
        text_config = text_encoder_config(path / "text_encoder.json", {})
        config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        return cls(
            vae,
            mmdit.requires_grad_(False),
            build_text_encoder_from_config(text_config),
            text_config,
            dataclass_from(RectifiedFlowConfig, meta.get("flow", {})),
            VideoSpec(**meta["video"]),
            config=config,
            v2v_frames=int(meta.get("v2v_frames", 0)),
            **kwargs,
        )

    @classmethod
    def load(
        cls,
        model: str | ModelSource,
        *,
        vae_dir: str | Path = DEFAULT_VAE_DIR,
        latent_stats: str | Path = DEFAULT_LATENT_STATS,
        tracking_uri: str | None = None,
        **kwargs: Any,
    ) -> T2VPipeline:
        """From a ``--model`` value (see the module docstring) or an already resolved source."""
        source = model if isinstance(model, ModelSource) else resolve_model(model, tracking_uri)
        if source.kind == "training":
            return cls.from_training(source.ref, vae_dir, latent_stats, **kwargs)
        if source.kind == "bundle":
            return cls.from_bundle(source.ref, tracking_uri=tracking_uri, **kwargs)
        _client(tracking_uri)
        with tempfile.TemporaryDirectory(prefix="opensora-model-") as tmp:
            return cls.from_bundle(
                download_bundle(source.model_uri, tmp), tracking_uri=tracking_uri, **kwargs
            )

    def apply_lora(self, adapter: str | Path, scale: float = 1.0) -> dict[str, Any]:
        """Merge a LoRA adapter (a folder, or a final/ or bundle holding ``adapter/``) into the MMDiT
        at ``scale``; returns its adapter.json. InputError (exit 2) when it was trained on a base
        of other shapes."""
        dtype = next(self.mmdit.parameters()).dtype
        self.mmdit.float()
        meta = merge_adapter_into(self.mmdit, adapter, scale)
        self.mmdit.to(dtype)
        return meta

    def save_bundle(self, path: str | Path, adapter: str | Path | None = None) -> Path:
        """Write this pipeline as a bundle folder (see the module docstring); returns it. With
        ``adapter``, an adapter bundle: the adapter and a reference to its base instead of the
        MMDiT weights (:mod:`opensora_core.inference.adapters`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vae.to("cpu").save(path, "vae")
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.mmdit.state_dict().items()}
        save_file(tensors, str(path / "mmdit.safetensors"))
        write_json(path / "mmdit_config.json", dataclasses.asdict(self.mmdit.config))
        text = dataclasses.asdict(self.text_config) | {"cache_dir": ""}
        write_json(path / "text_encoder.json", text)
        write_json(path / "latent_stats.json", self.vae.get_latent_stats())
        write_json(path / "config.json", self.config)
        meta = {
            "format": BUNDLE_FORMAT,
            "video": dataclasses.asdict(self.video),
            "flow": dataclasses.asdict(self.flow),
            "v2v_frames": self.v2v_frames,
            "text_encoder": self.text_encoder.name,
        }
        if adapter is not None:
            meta["base"] = write_adapter_bundle(path, adapter)
        write_json(path / BUNDLE_FILE, meta)
        if not self.offload:
            self.vae.to(self.device)
        return path

    # ---- devices -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module | TextEncoder) -> Iterator[None]:
        """With ``offload``, move ``module`` to the device for the block and back to the CPU after."""
        if not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ---- generation ----------------------------------------------------------------------
    def check_video(self, video: VideoSpec) -> None:
        """ConfigError unless the VAE and the patch size can make ``video``."""
        f = self.spatial_factor
        if video.height % f or video.width % f:
            raise ConfigError(f"height and width must be multiples of {f}, got {video.height}x{video.width}")
        tf = self.vae.temporal_factor
        if video.num_frames != 1 and (video.num_frames - 1) % tf:
            raise ConfigError(f"num_frames must be 1 or {tf}k+1, got {video.num_frames}")

    def encode_text(
        self, prompts: list[str], negative_prompt: str = ""
    ) -> tuple[TextEmbeddings, TextEmbeddings]:
        """Prompts' embeddings (B rows) and the unconditional ones: the negative prompt's, or the empty prompt's."""
        with self._on_device(self.text_encoder):
            text = self.text_encoder.encode(prompts)
            null = (
                self.text_encoder.encode([negative_prompt])
                if negative_prompt
                else self.text_encoder.null_embeddings()
            )
        return text.to(self.device), null.to(self.device)

    @torch.no_grad()
    def reference_latents(self, ref: np.ndarray, cond_type: str, video: VideoSpec) -> torch.Tensor:
        """Latents (1, C, T', H', W') of the reference video built by :func:`prepare_reference`."""
        clip = prepare_reference(ref, cond_type, video).to(self.device)
        with self._on_device(self.vae):
            return self.vae.encode(clip).float()

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        options: SamplingOptions | None = None,
        video: VideoSpec | None = None,
        *,
        cond_type: str = "t2v",
        ref: np.ndarray | None = None,
        negative_prompt: str = "",
        batch_size: int = 4,
        progress: bool = False,
    ) -> list[np.ndarray]:
        """One video (T, H, W, 3) uint8 per prompt; prompt i's noise comes from ``seeds[i]`` alone.

        ``cond_type`` other than ``t2v`` needs ``ref``: frames (Tr, H0, W0, 3) uint8 (an image
        has Tr = 1). Batches of ``batch_size`` share one sampler call.
        """
        options = options or SamplingOptions()
        video = video or self.video
        self.check_video(video)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if cond_type not in CONDITION_TYPES:
            raise ConfigError(f"unknown condition type {cond_type!r}; valid: {', '.join(CONDITION_TYPES)}")
        if cond_type != "t2v" and ref is None:
            raise InputError(f"condition type {cond_type} needs a reference image or video")
        # 1. text and reference
        text, null = self.encode_text(prompts, negative_prompt)
        latent_shape = self.vae.latent_shape(video.num_frames, video.height, video.width)
        ref_latents = self.reference_latents(ref, cond_type, video) if cond_type != "t2v" else None
        # 2. batches: noise from each sample's seed, sample, decode
        out: list[np.ndarray] = []
        starts = range(0, len(prompts), max(1, batch_size))
        for start in tqdm(starts, desc="generating", disable=not progress or len(starts) < 2):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            noise = prepare_noise([seeds[i] for i in idx], latent_shape, self.device)
            cond_mask = cond_ref = None
            if ref_latents is not None:
                cond = build_conditions(
                    [cond_type] * len(idx), ref_latents.expand(len(idx), *latent_shape), self.v2v_frames
                )
                cond_mask, cond_ref = cond.mask, cond.masked_ref
            with self._on_device(self.mmdit):
                latents = sample(
                    self.mmdit, noise, text.select(idx), null, options, self.flow, cond_mask, cond_ref
                )
            with self._on_device(self.vae):
                frames = self.vae.decode(latents)
            out.extend(to_uint8(frames))
        return out

    def generate_t2i2v(
        self,
        prompts: list[str],
        seeds: list[int],
        options: SamplingOptions | None = None,
        video: VideoSpec | None = None,
        **kwargs: Any,
    ) -> list[np.ndarray]:
        """Text to image to video: a still (T = 1) per prompt, then ``i2v_head`` from that still."""
        video = video or self.video
        kwargs.pop("cond_type", None)
        kwargs.pop("ref", None)
        still_spec = dataclasses.replace(video, num_frames=1)
        stills = self.generate(prompts, seeds, options, still_spec, **kwargs)
        return [
            self.generate([p], [s], options, video, cond_type="i2v_head", ref=still, **kwargs)[0]
            for p, s, still in zip(prompts, seeds, stills)
        ]


# --------------------------------------------------------------------------------------------
# Helpers
