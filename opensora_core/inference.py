"""Text-to-video inference: one pipeline object from VAE, latent statistics, MMDiT and text encoder.

Where a model comes from (``--model``), resolved before anything is loaded:

- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a registered pyfunc model (the register
  stage's), downloaded from the MLflow store;
- a 32-hex run id: the model that run logged;
- a folder: an inference bundle (``bundle.json``, what the pyfunc model carries) or a diffusion
  stage's ``final/`` folder (``mmdit_config.json``), paired with the VAE's ``final/`` folder and
  ``latent_stats.json``.

A bundle folder holds everything generation needs::

    bundle.json          format, video defaults (frames, size, fps), flow config, v2v frames
    vae.safetensors      VAE weights with the latent statistics in its buffers (+ vae.json)
    latent_stats.json    the statistics, readable
    mmdit.safetensors    MMDiT weights (EMA) + mmdit_config.json
    text_encoder.json    the text encoder's config (a reference: weights come from its package)
    config.json          the resolved pipeline config of the run that trained it

:meth:`T2VPipeline.generate` encodes the prompts, draws each sample's noise from its own seed,
samples latents (:mod:`opensora_core.diffusion.sampling`) and decodes them to uint8 frames.
With ``offload`` the models not in use wait on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from opensora_core.data.buckets import ASPECT_RATIOS, aspect_ratio_table, closest_ratio, parse_bucket_config
from opensora_core.data.dataset import prepare_video
from opensora_core.data.video_io import read_video
from opensora_core.diffusion.conditions import CONDITION_TYPES, build_conditions
from opensora_core.diffusion.rectified_flow import RectifiedFlowConfig
from opensora_core.diffusion.sampling import SamplingOptions, prepare_noise, sample
from opensora_core.errors import ConfigError, InputError
from opensora_core.models.mmdit.model import MMDiT, MMDiTConfig, build_mmdit
from opensora_core.models.text.encoders import (
    TextEmbeddings,
    TextEncoder,
    TextEncoderConfig,
    build_text_encoder_from_config,
)
from opensora_core.models.vae.model import VideoAutoencoder

log = logging.getLogger("opensora.inference")

BUNDLE_FORMAT = "opensora-t2v-bundle/1"
BUNDLE_FILE = "bundle.json"
DEFAULT_MODEL = "models:/opensora-t2v@champion"
DEFAULT_VAE_DIR = "models/vae/final"
DEFAULT_LATENT_STATS = "models/vae/latent_stats.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class VideoSpec:
    """Shape and rate of the videos to generate."""

    num_frames: int = 9
    """Frames per video: 1 (a still, PNG) or 4k+1 for the causal VAE."""
    height: int = 64
    """Pixel height (a multiple of the VAE factor times the patch size)."""
    width: int = 64
    """Pixel width."""
    fps: float = 8.0
    """Frames per second of the written mp4."""

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.height < 1 or self.width < 1 or self.fps <= 0:
            raise ConfigError(f"invalid video spec {self}")


# --------------------------------------------------------------------------------------------
# Where a model comes from
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--model``: ``kind`` is ``registry``, ``run``, ``bundle`` or ``training``."""

    kind: str
    ref: str
    """The models:/ URI, the run id or the folder."""
    model_uri: str = ""
    """registry and run: the URI MLflow downloads the pyfunc model from."""


def resolve_model(spec: str, tracking_uri: str | None = None) -> ModelSource:
    """Say where ``spec`` points without loading anything; InputError (exit 2) naming it if nowhere."""
    spec = spec.strip()
    if not spec:
        raise InputError("no model given (use models:/NAME@ALIAS, a run id or a folder)")
    if spec.startswith("models:/"):
        return ModelSource("registry", spec, _check_registry_uri(spec, tracking_uri))
    path = Path(spec)
    if path.is_dir():
        if (path / BUNDLE_FILE).is_file():
            return ModelSource("bundle", str(path))
        if (path / "mmdit_config.json").is_file():
            return ModelSource("training", str(path))
        raise InputError(f"model folder {path} holds neither {BUNDLE_FILE} nor mmdit_config.json")
    if _RUN_ID_RE.match(spec):
        return ModelSource("run", spec, _model_uri_of_run(spec, tracking_uri))
    raise InputError(f"model {spec!r} is not a models:/ URI, an MLflow run id or an existing folder")


def _client(tracking_uri: str | None) -> Any:
    """A client on ``tracking_uri`` for both runs and the registry; the global URIs follow it, so
    a later ``mlflow.pyfunc.load_model("models:/...")`` reads the same store."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=tracking_uri or mlflow.get_registry_uri())


def _check_registry_uri(uri: str, tracking_uri: str | None) -> str:
    """The URI itself, once the name and alias (or version) are known to the registry."""
    body = uri[len("models:/") :]
    name, sep, alias = body.partition("@")
    version = ""
    if not sep:
        name, _, version = body.partition("/")
    if not name or not (alias or version):
        raise InputError(f"model URI {uri!r} must be models:/NAME@ALIAS or models:/NAME/VERSION")
    client = _client(tracking_uri)
    try:
        client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as exc:  # MlflowException: unknown name, alias or version
        raise InputError(f"model {uri!r} does not resolve in the MLflow registry: {exc}") from exc
    return uri


def _model_uri_of_run(run_id: str, tracking_uri: str | None) -> str:
    """``models:/<model id>`` of the pyfunc model run ``run_id`` logged."""
    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise InputError(f"run {run_id} not found in the MLflow store: {exc}") from exc
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    if not models:
        raise InputError(f"run {run_id} logged no model (the register stage's run does)")
    return f"models:/{models[0].model_id}"


def download_bundle(model_uri: str, dest: str | Path | None = None) -> Path:
    """Download a logged pyfunc model and return the bundle folder inside it."""
    import mlflow

    root = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest) if dest else None)
    )
    found = sorted(root.rglob(BUNDLE_FILE))
    if not found:
        raise InputError(f"{model_uri}: the downloaded model has no {BUNDLE_FILE}")
    return found[0].parent


# --------------------------------------------------------------------------------------------
# Reading what training wrote
# --------------------------------------------------------------------------------------------
def load_mmdit_final(path: str | Path, use_ema: bool = True) -> MMDiT:
    """MMDiT of a diffusion stage's ``final/`` folder (``ema.safetensors`` or ``model.safetensors``)."""
    path = Path(path)
    config = _read_json(path / "mmdit_config.json")
    model = build_mmdit(_dataclass_from(MMDiTConfig, config))
    names = ("ema.safetensors", "model.safetensors") if use_ema else ("model.safetensors",)
    weights = next((path / n for n in names if (path / n).is_file()), None)
    if weights is None:
        raise InputError(f"no MMDiT weights ({' or '.join(names)}) in {path}")
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)


def load_vae_dir(path: str | Path) -> VideoAutoencoder:
    """The VAE of ``path``: the VAE stage's ``final/`` folder (its loader) or a ``VideoAutoencoder.save`` pair."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"VAE folder not found: {path} (run the vae_train stage first)")
    try:
        from opensora_core.training.vae_trainer import load_vae_final
    except ImportError:
        load_vae_final = None
    if load_vae_final is not None:
        loaded = load_vae_final(path)
        vae = loaded[0] if isinstance(loaded, tuple) else loaded
    else:
        name = next((n for n in ("ema", "model", "vae") if (path / f"{n}.safetensors").is_file()), None)
        if name is None:
            raise InputError(f"no VAE weights in {path}")
        vae = VideoAutoencoder.load(path, name)
    return vae.eval().requires_grad_(False)


def load_latent_stats(path: str | Path) -> dict[str, Any]:
    return _read_json(Path(path))


def find_flow_config(config: Mapping[str, Any]) -> RectifiedFlowConfig:
    """The rectified-flow options of a resolved pipeline config (``diffusion.flow``), else defaults."""
    diffusion = config.get("diffusion") or {}
    for key in ("flow", "rectified_flow"):
        if isinstance(diffusion.get(key), Mapping):
            return _dataclass_from(RectifiedFlowConfig, diffusion[key])
    return RectifiedFlowConfig()


def find_v2v_frames(config: Mapping[str, Any]) -> int:
    """``v2v_frames`` of the last diffusion stage's condition settings (0 = half the clip)."""
    stage = last_stage_config(config)
    for node in (stage.get("conditions"), stage, config.get("diffusion")):
        if isinstance(node, Mapping) and "v2v_frames" in node:
            return int(node["v2v_frames"])
    return 0


def default_video_spec(config: Mapping[str, Any], spatial_factor: int, fps: float = 8.0) -> VideoSpec:
    """The last diffusion stage's largest video bucket (T > 1) at aspect ratio 1, else 9 x 64 x 64.

    ``spatial_factor`` is the VAE factor times the patch size: sides are multiples of it.
    """
    stage = last_stage_config(config)
    buckets = stage.get("buckets")
    if isinstance(buckets, Mapping) and buckets:
        try:
            entries = parse_bucket_config(buckets)
        except ConfigError:
            entries = []
        videos = [e for e in entries if e[1] > 1] or entries
        if videos:
            resolution, num_frames = videos[0][0], videos[0][1]
            h, w = aspect_ratio_table(resolution, spatial_factor)[1.0]
            return VideoSpec(num_frames, h, w, fps)
    return VideoSpec(9, 64, 64, fps)


def video_size(resolution: str, aspect_ratio: str, spatial_factor: int) -> tuple[int, int]:
    """(height, width) of a resolution name (``64px``, ``480p``) at ``aspect_ratio`` (``9:16``, ``0.75``)."""
    ratio_text = aspect_ratio.strip()
    try:
        if ":" in ratio_text:
            a, b = ratio_text.split(":")
            ratio = float(a) / float(b)
        else:
            ratio = float(ratio_text)
    except ValueError as exc:
        raise ConfigError(f"aspect ratio must be H:W or a number, got {aspect_ratio!r}") from exc
    if ratio <= 0:
        raise ConfigError(f"aspect ratio must be positive, got {aspect_ratio!r}")
    table = aspect_ratio_table(resolution, spatial_factor)
    return table[closest_ratio(ratio, 1.0, ASPECT_RATIOS)]


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------
def load_reference(path: str | Path) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 of a reference image (T = 1) or video; InputError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference not found: {path}")
    try:
        frames, _ = read_video(path)
    except Exception as exc:  # PIL / PyAV errors of every kind
        raise InputError(f"reference {path} could not be read: {exc}") from exc
    return frames


def prepare_reference(frames: np.ndarray, cond_type: str, video: VideoSpec) -> torch.Tensor:
    """A (1, 3, T, H, W) video in [-1, 1] whose conditioned frames come from ``frames`` (Tr, H0, W0, 3).

    An image fills every frame. From a video, i2v types take its first frame (``i2v_tail`` its
    last), v2v types its first T frames (``v2v_tail`` its last T), repeating the edge frame when
    it is shorter. The VAE encodes the result; the condition mask then keeps the given frames.
    """
    clip = prepare_video(np.asarray(frames, dtype=np.uint8), video.height, video.width)  # (3, Tr, H, W)
    t_ref, t = clip.shape[1], video.num_frames
    if t_ref == 1 or cond_type.startswith("i2v"):
        pick = clip[:, -1:] if cond_type == "i2v_tail" else clip[:, :1]
        return pick.expand(3, t, *pick.shape[2:]).unsqueeze(0).contiguous()
    if cond_type == "v2v_tail":
        part = clip[:, -t:]
        pad = clip[:, :1].expand(3, t - part.shape[1], *clip.shape[2:])
        return torch.cat([pad, part], dim=1).unsqueeze(0)
    part = clip[:, :t]
    pad = clip[:, -1:].expand(3, t - part.shape[1], *clip.shape[2:])
    return torch.cat([part, pad], dim=1).unsqueeze(0)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
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
        config = (
            _read_json(diffusion_dir / "config.json") if (diffusion_dir / "config.json").is_file() else {}
        )
        vae = load_vae_dir(vae_dir)
        vae.set_latent_stats(load_latent_stats(latent_stats))
        mmdit = load_mmdit_final(diffusion_dir, use_ema=use_ema)
        text_config = _text_config(diffusion_dir / "text_encoder.json", config)
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
    def from_bundle(cls, path: str | Path, **kwargs: Any) -> T2VPipeline:
        """From a bundle folder written by :meth:`save_bundle`."""
        path = Path(path)
        meta = _read_json(path / BUNDLE_FILE)
        if meta.get("format") != BUNDLE_FORMAT:
            raise InputError(f"{path / BUNDLE_FILE}: unknown format {meta.get('format')!r}")
        vae = VideoAutoencoder.load(path, "vae")
        mmdit = build_mmdit(_dataclass_from(MMDiTConfig, _read_json(path / "mmdit_config.json")))
        mmdit.load_state_dict(load_file(str(path / "mmdit.safetensors")))
        text_config = _text_config(path / "text_encoder.json", {})
        config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
        return cls(
            vae,
            mmdit.requires_grad_(False),
            build_text_encoder_from_config(text_config),
            text_config,
            _dataclass_from(RectifiedFlowConfig, meta.get("flow", {})),
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
            return cls.from_bundle(source.ref, **kwargs)
        _client(tracking_uri)
        with tempfile.TemporaryDirectory(prefix="opensora-model-") as tmp:
            return cls.from_bundle(download_bundle(source.model_uri, tmp), **kwargs)

    def save_bundle(self, path: str | Path) -> Path:
        """Write this pipeline as a bundle folder (see the module docstring); returns it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vae.to("cpu").save(path, "vae")
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.mmdit.state_dict().items()}
        save_file(tensors, str(path / "mmdit.safetensors"))
        _write_json(path / "mmdit_config.json", dataclasses.asdict(self.mmdit.config))
        text = dataclasses.asdict(self.text_config) | {"cache_dir": ""}
        _write_json(path / "text_encoder.json", text)
        _write_json(path / "latent_stats.json", self.vae.get_latent_stats())
        _write_json(path / "config.json", self.config)
        meta = {
            "format": BUNDLE_FORMAT,
            "video": dataclasses.asdict(self.video),
            "flow": dataclasses.asdict(self.flow),
            "v2v_frames": self.v2v_frames,
            "text_encoder": self.text_encoder.name,
        }
        _write_json(path / BUNDLE_FILE, meta)
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
# --------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _dataclass_from(cls: type, data: Mapping[str, Any]) -> Any:
    """``cls(**data)`` with only the keys ``cls`` knows (files may carry more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def last_stage_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Settings of the last stage in a resolved config's ``diffusion.stages`` ({} when none)."""
    stages = (config.get("diffusion") or {}).get("stages") or {}
    if isinstance(stages, Mapping) and stages:
        last = list(stages.values())[-1]
        return last if isinstance(last, Mapping) else {}
    return {}


def _text_config(path: Path, config: Mapping[str, Any]) -> TextEncoderConfig:
    """The text encoder's config: ``text_encoder.json``, else ``diffusion.text_encoder``, else MiniLM."""
    data: Mapping[str, Any] = {}
    if path.is_file():
        data = _read_json(path)
    elif isinstance((config.get("diffusion") or {}).get("text_encoder"), Mapping):
        data = config["diffusion"]["text_encoder"]
    return _dataclass_from(TextEncoderConfig, {**data, "cache_dir": ""})
