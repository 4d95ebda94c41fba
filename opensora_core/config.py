"""Typed pipeline configuration: one dataclass per params.yaml section.

Precedence, lowest first: the dataclass defaults < ``params.yaml`` < the profile named by its
``profile:`` key (a YAML file in ``params/``) < ``--set section.key=value`` overrides.
Unknown keys are errors that name the key and the valid ones; invariants are checked in
``__post_init__``. This module imports only the standard library and PyYAML, so light CLIs
(``tasks.meta``) can use it and still start fast.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opensora_core.errors import ConfigError

PROFILE_DIR = "params"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class IngestConfig:
    source: str = "synthetic"
    """Where clips come from: ``synthetic`` (MovingShapes), ``folder`` or ``csv``."""
    path: str = ""
    """The folder (source ``folder``) or CSV file (source ``csv``) to read; read in place."""
    val_fraction: float = 0.1
    """Share of rows assigned to ``val`` for non-synthetic sources, by a hash of the path."""
    num_clips: int = 150
    """Synthetic: number of video clips."""
    num_stills: int = 30
    """Synthetic: number of one-frame stills, written as PNG."""
    sizes: list[list[int]] = field(default_factory=lambda: [[64, 64], [48, 64], [64, 48]])
    """Synthetic: frame sizes as ``[height, width]`` pairs, drawn uniformly."""
    num_frames: list[int] = field(default_factory=lambda: [9, 17])
    """Synthetic: clip lengths in frames (4k+1, what causal video VAEs expect)."""
    fps: list[int] = field(default_factory=lambda: [8, 12, 24])
    """Synthetic: frame rates, drawn uniformly."""
    val_combos: int = 6
    """Synthetic: number of (shape, colour, motion) combinations held out whole as ``val``."""
    seed: int = 0
    """Synthetic: seed of the generator; the same seed writes the same clips."""

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "folder", "csv"):
            raise ConfigError(f"ingest.source must be synthetic, folder or csv, got {self.source!r}")
        if self.source in ("folder", "csv") and not self.path:
            raise ConfigError(f"ingest.path is required when ingest.source is {self.source!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"ingest.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_clips < 0 or self.num_stills < 0:
            raise ConfigError("ingest.num_clips and ingest.num_stills must be >= 0")
        if not (self.sizes and self.num_frames and self.fps):
            raise ConfigError("ingest.sizes, ingest.num_frames and ingest.fps must not be empty")
        for hw in self.sizes:
            # h264 with yuv420p chroma needs even sides.
            if len(hw) != 2 or min(hw) < 16 or hw[0] % 2 or hw[1] % 2:
                raise ConfigError(f"ingest.sizes entries are even [height, width] >= 16, got {hw}")
        if any(n < 5 or n % 4 != 1 for n in self.num_frames):
            raise ConfigError(f"ingest.num_frames entries must be 4k+1 and >= 5, got {self.num_frames}")
        if any(f <= 0 for f in self.fps):
            raise ConfigError(f"ingest.fps must be positive, got {self.fps}")
        if self.val_combos < 0:
            raise ConfigError(f"ingest.val_combos must be >= 0, got {self.val_combos}")


@dataclass
class MetaConfig:
    num_workers: int = 2
    """pandarallel workers for probing (0 = serial in this process)."""
    progress: bool = True
    """Show a progress bar while probing."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"meta.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class ValidateConfig:
    max_bad_fraction: float = 0.1
    """Above this share of quarantined rows the stage fails with exit code 3."""
    min_fps: float = 1.0
    """Lowest accepted frame rate (videos only; stills have none)."""
    max_fps: float = 120.0
    """Highest accepted frame rate."""
    min_side: int = 16
    """Smallest accepted height and width in pixels."""
    max_side: int = 8192
    """Largest accepted height and width in pixels."""
    min_aspect_ratio: float = 0.25
    """Smallest accepted height / width."""
    max_aspect_ratio: float = 4.0
    """Largest accepted height / width."""
    min_text_length: int = 1
    """Captions shorter than this many characters (after stripping) are rejected."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"validate.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.min_fps > self.max_fps or self.min_side > self.max_side:
            raise ConfigError("validate: min_* must not exceed max_*")
        if self.min_aspect_ratio > self.max_aspect_ratio:
            raise ConfigError("validate.min_aspect_ratio must not exceed validate.max_aspect_ratio")


@dataclass
class ShardConfig:
    rows_per_shard: int = 64
    """Rows per shard file (the last shard may hold fewer)."""
    num_shards: int = 0
    """If > 0, split into this many shards instead (overrides rows_per_shard)."""
    seed: int = 0
    """Seed of the deterministic row order inside the shards."""

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise ConfigError(f"shard.rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.num_shards < 0:
            raise ConfigError(f"shard.num_shards must be >= 0, got {self.num_shards}")


@dataclass
class LaunchConfig:
    nnodes: int = 1
    """Number of nodes torchrun spans."""
    nproc_per_node: int = 1
    """Processes per node (one per GPU; 1 on CPU)."""
    rdzv_endpoint: str = ""
    """host:port of the rendezvous for multi-node runs; empty runs ``--standalone``."""
    rdzv_id: str = "opensora"
    """Rendezvous id shared by all nodes of one job."""
    node_rank: int = -1
    """This node's rank for static rendezvous; -1 lets the c10d rendezvous assign it."""
    timeout_s: int = 0
    """Kill the whole job after this many seconds (0 = no limit)."""
    omp_num_threads: int = 0
    """OMP_NUM_THREADS for each worker (0 = leave torch's default)."""
    kill_grace_s: float = 10.0
    """Seconds between SIGTERM and SIGKILL when a job is killed (timeout, cancel, Ctrl-C)."""

    def __post_init__(self) -> None:
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise ConfigError("launch.nnodes and launch.nproc_per_node must be >= 1")
        if self.timeout_s < 0 or self.omp_num_threads < 0 or self.kill_grace_s < 0:
            raise ConfigError("launch.timeout_s, launch.omp_num_threads and launch.kill_grace_s must be >= 0")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("launch.rdzv_endpoint is required when launch.nnodes > 1")


@dataclass
class VaeTrainConfig:
    steps: int = 300
    """Optimiser steps."""
    plugin: str = "ddp"
    """ColossalAI plugin: ``ddp`` (CPU gloo or GPU) or ``zero2`` (GPU only)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"vae_train.steps must be >= 0, got {self.steps}")
        _check_plugin("vae_train.plugin", self.plugin)


@dataclass
class VaeStatsConfig:
    num_samples: int = 256
    """Number of clips whose latents enter the statistics."""


@dataclass
class DiffusionStageConfig:
    steps: int = 200
    """Optimiser steps of this stage."""
    lr: float = 1e-4
    """Peak learning rate of this stage."""


@dataclass
class DiffusionConfig:
    stages: dict[str, DiffusionStageConfig] = field(
        default_factory=lambda: {
            "stage1": DiffusionStageConfig(),
            "stage2": DiffusionStageConfig(),
            "stage3": DiffusionStageConfig(),
        }
    )
    """Ordered mapping NAME -> that stage's settings; each stage starts from the previous one."""
    plugin: str = "ddp"
    """ColossalAI plugin for diffusion training: ``ddp`` or ``zero2`` (GPU only)."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("diffusion.stages must name at least one stage")
        _check_plugin("diffusion.plugin", self.plugin)


@dataclass
class EvaluateConfig:
    num_steps: int = 20
    """Sampling steps during evaluation."""


@dataclass
class RegisterConfig:
    model_name: str = "opensora-t2v"
    """Name of the registered MLflow model."""
    gate: dict[str, float] = field(default_factory=dict)
    """Promotion gate: metric -> minimum value the candidate must reach to become champion."""
    compare_metric: str = "adherence_color"
    """Metric compared with the current champion (higher is better)."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log stages to MLflow."""
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI (the env variable MLFLOW_TRACKING_URI overrides it)."""
    experiment: str = "opensora"
    """MLflow experiment name."""
    artifact_dir: str = "mlartifacts"
    """Artifact location of the experiment, relative to the project root."""


@dataclass
class FlowConfig:
    schedule_cron: str = "0 2 * * *"
    """Cron schedule of the served deployment (default: nightly at 02:00)."""
    retries: int = 2
    """Retries of a stage that failed with a retryable exit code."""
    retry_delay_s: int = 5
    """Seconds between retries."""
    stage_timeout_s: dict[str, int] = field(default_factory=dict)
    """Per-stage timeout in seconds, stage name -> seconds (missing = default_timeout_s)."""
    default_timeout_s: int = 3600
    """Timeout of a stage not named in stage_timeout_s."""


@dataclass
class Config:
    """The whole resolved configuration, one attribute per params.yaml section."""

    profile: str = ""
    """A file name in ``params/`` layered over params.yaml, or empty."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    vae_train: VaeTrainConfig = field(default_factory=VaeTrainConfig)
    vae_stats: VaeStatsConfig = field(default_factory=VaeStatsConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PLUGINS = ("ddp", "zero2")


def _check_plugin(key: str, value: str) -> None:
    if value not in PLUGINS:
        raise ConfigError(f"{key} must be one of {', '.join(PLUGINS)}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_config(
    params_path: str | Path = "params.yaml",
    overrides: list[str] | None = None,
    *,
    profile_dir: str | Path | None = None,
) -> Config:
    """Resolve the configuration: defaults < params.yaml < profile < ``--set`` overrides.

    ``overrides`` are ``section.key=value`` strings; values are parsed as YAML
    (``--set ingest.sizes='[[32,32]]'``). A ``--set profile=NAME`` picks the profile.
    """
    params_path = Path(params_path)
    if not params_path.is_file():
        raise ConfigError(f"params file not found: {params_path}")
    base = _read_yaml(params_path)
    override_tree = parse_overrides(overrides or [])
    profile = override_tree.get("profile", base.get("profile")) or ""
    merged = copy.deepcopy(base)
    if profile:
        pdir = Path(profile_dir) if profile_dir else params_path.parent / PROFILE_DIR
        merged = deep_merge(merged, _read_yaml(resolve_profile_path(pdir, str(profile))))
    merged = deep_merge(merged, override_tree)
    merged["profile"] = profile
    return build_dataclass(Config, merged, "")


def resolve_profile_path(profile_dir: Path, profile: str) -> Path:
    """The file a ``profile:`` value names: ``params/NAME`` or ``params/NAME.yaml``."""
    for candidate in (profile_dir / profile, profile_dir / f"{profile}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in profile_dir.glob("*.yaml")) if profile_dir.is_dir() else []
    raise ConfigError(
        f"profile {profile!r} not found in {profile_dir}/; known profiles: {', '.join(known) or 'none'}"
    )


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "a.c=[1,2]"]`` -> ``{"a": {"b": 1, "c": [1, 2]}}``."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from exc
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is set both as a value and a section")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``update``, merging nested mappings key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build ``cls`` from a mapping, checking keys and types; ``prefix`` names it in errors."""
    where = prefix or "params"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key '{key}'; valid keys in [{where}]: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(value)
    if origin is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        key_tp, val_tp = args or (Any, Any)
        return {
            _coerce(key_tp, k, key) if key_tp is not str else str(k): _coerce(val_tp, v, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------
def config_hash(obj: Any, exclude: tuple[str, ...] = ()) -> str:
    """SHA-256 of a dataclass or mapping as canonical JSON, less the dotted keys in ``exclude``."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else copy.deepcopy(obj)
    for dotted in exclude:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    blob = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def section_help(cls: type) -> dict[str, str]:
    """Field name -> its docstring, read from the dataclass source (for --help and docs)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
