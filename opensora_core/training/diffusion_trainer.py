"""Diffusion training, one stage of ``diffusion.stages``: the MMDiT learns the rectified flow of VAE latents.

The job ``opensora_core.jobs.train_diffusion`` runs :func:`train_stage` on every rank:

1. the frozen parts: the VAE with its latent statistics, the text encoder;
2. the data: shard rows -> bucket batches (resumable sampler) -> cached latents or clips to encode;
3. the MMDiT, started from the previous stage's final EMA weights (the first stage from
   ``diffusion.init_from`` or from scratch; ``--load`` overrides both), boosted by ColossalAI
   (``ddp`` / ``zero2``) with AdamW, beside the LR schedule and the EMA;
4. the latest checkpoint saved with the same resolved config, if any, is resumed;
5. :meth:`DiffusionTrainer.train_step`: latents -> flow inputs (times, noise, conditions, text
   dropout) -> masked flow loss -> backward -> clip -> optimizer step -> EMA, under the OOM guard and
   the non-finite-loss guard; metrics every ``log_every`` steps, samples every ``sample_every``,
   checkpoints every ``ckpt_every``;
6. ``models/diffusion/NAME/final/`` (written atomically), the loss curve and the summary.

The resume hash covers the resolved config less step counts and logging (see :data:`RUN_EXCLUDE`)
plus what the stage read: the initial weights' sha256, the VAE's sha256 and the shards' content
hash, so new upstream outputs start the stage fresh.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from opensora_core.config import Config, DiffusionConfig, DiffusionStageConfig, TrainConfig
from opensora_core.data.buckets import Buckets
from opensora_core.data.dataset import VideoDataset
from opensora_core.data.sampler import BucketBatchSampler, InfiniteLoader
from opensora_core.data.shards import ShardReader, file_sha256
from opensora_core.diffusion.conditions import Condition, build_conditions, sample_condition_types
from opensora_core.diffusion.denoiser import predict_velocity
from opensora_core.diffusion.rectified_flow import RectifiedFlow, loss_by_bin
from opensora_core.diffusion.sampling import SamplingOptions, prepare_noise, sample_euler
from opensora_core.distributed.booster import build_booster, maybe_clip_grad_norm, unwrap_model
from opensora_core.distributed.dist import DistInfo, all_reduce_sum, broadcast_object, set_seed
from opensora_core.errors import ConfigError, InputError, NonFiniteLoss, OutOfMemory
from opensora_core.models.mmdit import MMDIT_SIZES, MMDiT, build_mmdit, load_mmdit_weights
from opensora_core.models.mmdit.loader import LoadReport
from opensora_core.models.text.encoders import (
    CachedTextEncoder,
    TextEmbeddings,
    TextEncoder,
    build_text_encoder_from_config,
    drop_conditions,
)
from opensora_core.tracking import NullRun, start_stage_run
from opensora_core.training.checkpoint import (
    RESUME_EXCLUDE,
    CheckpointedTrainer,
    find_resume_checkpoint,
    is_complete,
    resume_config_hash,
)
from opensora_core.training.ema import EMA
from opensora_core.training.latent_cache import (
    LatentCache,
    LatentDataset,
    build_latent_loader,
    encode_batch_latents,
)
from opensora_core.training.lr_schedule import build_lr_scheduler

log = logging.getLogger("opensora.diffusion")

T = TypeVar("T")

FINAL_MODEL = "model.safetensors"
FINAL_EMA = "ema.safetensors"
FINAL_FILES = (FINAL_MODEL, FINAL_EMA, "mmdit_config.json", "config.json", "text_encoder.json")

RUN_EXCLUDE: tuple[str, ...] = (
    *RESUME_EXCLUDE,
    "ingest",
    "meta",
    "validate",
    "shard",
    "vae_train",
    "vae_stats",
    "train",
    "diffusion.cache_dir",
    "diffusion.sample_*",
    "diffusion.num_samples",
    "diffusion.loss_bins",
)
"""Left out of a stage's resume hash beside RESUME_EXCLUDE: the sections before training (their
outputs enter the hash as the shard content hash and the VAE's sha256), the profiler and MFU
settings, sample logging and the cache location. The other stages' settings are left out too."""


# --------------------------------------------------------------------------------------------
# Stages, paths, inputs
# --------------------------------------------------------------------------------------------
@dataclass
class StagePaths:
    """Where a stage reads and writes; every path relative to the project root unless absolute."""

    shards: Path = Path("data/shards")
    vae: Path = Path("models/vae/final")
    latent_stats: Path = Path("models/vae/latent_stats.json")
    models: Path = Path("models/diffusion")
    metrics: Path = Path("metrics")

    def final(self, stage: str) -> Path:
        return self.models / stage / "final"

    def ckpt(self, stage: str) -> Path:
        return self.models / stage / "ckpt"

    def loss_csv(self, stage: str) -> Path:
        return self.metrics / f"diffusion_{stage}_loss.csv"

    def summary(self, stage: str) -> Path:
        return self.metrics / f"diffusion_{stage}.json"


@dataclass
class LoadOptions:
    """``--load PATH``: start from a checkpoint folder or from weights instead of the stage's init."""

    path: str = ""
    """A complete checkpoint folder (``.../ckpt/step-NNNNNNNN``), a safetensors file or folder, or a
    diffusion ``final/`` folder (its EMA weights); empty = no load."""
    optimizer: bool | None = None
    """Load the optimizer state: None = yes for a checkpoint folder (weights have none)."""
    reset_step: bool = False
    """Start counting steps (and the data order) at 0 instead of the checkpoint's step."""
    redo_warmup: bool = False
    """Run the LR warmup again from the loaded step."""

    def spec(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if self.path else {}


def get_stage(cfg: DiffusionConfig, stage: str) -> DiffusionStageConfig:
    """The settings of ``stage``; ConfigError listing the stages when it is not one."""
    if stage not in cfg.stages:
        raise ConfigError(
            f"unknown diffusion stage {stage!r}; stages in diffusion.stages: {', '.join(cfg.stages)}"
        )
    return cfg.stages[stage]


def previous_stage(cfg: DiffusionConfig, stage: str) -> str | None:
    """The stage before ``stage`` in ``diffusion.stages``, or None for the first."""
    names = list(cfg.stages)
    position = names.index(stage)
    return names[position - 1] if position > 0 else None


def init_weights_path(cfg: DiffusionConfig, stage: str, paths: StagePaths) -> Path | None:
    """What a stage starts from: the previous stage's final EMA weights, else ``diffusion.init_from``."""
    prev = previous_stage(cfg, stage)
    if prev is not None:
        return paths.final(prev) / FINAL_EMA
    return Path(cfg.init_from) if cfg.init_from else None


def validate_stage(cfg: Config, stage: str, paths: StagePaths, load: LoadOptions | None = None) -> None:
    """Check what a stage needs before launching it: ConfigError (bad settings) or InputError (a path)."""
    stage_cfg = get_stage(cfg.diffusion, stage)
    if cfg.diffusion.model not in MMDIT_SIZES:
        raise ConfigError(f"unknown diffusion.model {cfg.diffusion.model!r}; sizes: {', '.join(MMDIT_SIZES)}")
    build_buckets(stage_cfg, spatial_factor=16)  # the bucket table parses
    if load is not None and load.path and load.optimizer and not is_complete(load.path):
        raise ConfigError(f"--load-optimizer needs a checkpoint folder; {load.path} holds weights only")
    needed = {
        "shard manifest (run the shard stage)": paths.shards / "manifest.json",
        "VAE (run the vae_train stage)": paths.vae,
        "latent statistics (run the vae_stats stage)": paths.latent_stats,
    }
    init = init_weights_path(cfg.diffusion, stage, paths)
    if load is not None and load.path:
        needed["--load path"] = Path(load.path)
    elif init is not None:
        prev = previous_stage(cfg.diffusion, stage)
        needed[f"initial weights (run diffusion_{prev})" if prev else "diffusion.init_from"] = init
    for what, path in needed.items():
        if not path.exists():
            raise InputError(f"{what}: {path} not found")


def build_buckets(stage_cfg: DiffusionStageConfig, spatial_factor: int) -> Buckets:
    """The stage's bucket set; sides are multiples of ``spatial_factor`` (VAE factor x patch size)."""
    return Buckets.from_config(
        stage_cfg.buckets,
        spatial_factor=spatial_factor,
        max_upscale=stage_cfg.max_upscale,
        frame_interval=stage_cfg.frame_interval,
        stills_from_videos=stage_cfg.stills_from_videos,
    )


def read_latent_stats(path: Path) -> dict[str, Any]:
    """``latent_stats.json``: ``mean``, ``std`` per channel, ``scale``, ``shift`` and ``vae_sha256``."""
    try:
        stats = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the latent statistics {path}: {exc}") from exc
    missing = [k for k in ("mean", "std", "vae_sha256") if k not in stats]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)} (written by the vae_stats stage)")
    return stats


def build_frozen_vae(path: Path, stats: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The VAE of ``path`` (its EMA weights) with the latent statistics, frozen, on ``device``."""
    from opensora_core.training.vae_trainer import load_vae_final  # diffusers: seconds to import

    vae = load_vae_final(path)
    vae.set_latent_stats(stats)
    return vae.to(device).eval().requires_grad_(False)


def build_stage_encoders(
    cfg: DiffusionConfig, vae_sha256: str, shards_hash: str, device: torch.device
) -> tuple[TextEncoder, LatentCache | None]:
    """The frozen text encoder and, with ``diffusion.latent_cache``, the cache of this VAE, encoder and
    data; the encoder's prompt embeddings are cached in it (else in ``text_encoder.cache_dir``, if set)."""
    text_cfg = cfg.text_encoder
    encoder = build_text_encoder_from_config(dataclasses.replace(text_cfg, cache_dir=""), device=device)
    cache = LatentCache(cfg.cache_dir, vae_sha256, encoder.name, shards_hash) if cfg.latent_cache else None
    text_cache = cache.text_dir if cache is not None else text_cfg.cache_dir
    return (CachedTextEncoder(encoder, text_cache) if text_cache else encoder), cache


# --------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# --------------------------------------------------------------------------------------------
def build_model(cfg: DiffusionConfig, text: TextEncoder, latent_channels: int, device: torch.device) -> MMDiT:
    """The named MMDiT size on ``device``; ConfigError when its input widths do not fit the encoders."""
    model = build_mmdit(cfg.model, device=device, checkpoint_blocks=cfg.checkpoint_blocks)
    mc = model.config
    wanted = {
        "context_in_dim (text token width)": (mc.context_in_dim, text.token_dim),
        "vec_in_dim (pooled text width)": (mc.vec_in_dim, text.pooled_dim),
        "latent channels": (mc.latent_channels, latent_channels),
    }
    for what, (have, need) in wanted.items():
        if have != need:
            raise ConfigError(f"MMDiT size {cfg.model!r} has {what} {have}, the encoders give {need}")
    return model


def build_optimizer(
    model: torch.nn.Module, cfg: DiffusionConfig, stage: DiffusionStageConfig
) -> torch.optim.AdamW:
    """AdamW over every trainable parameter at the stage's peak LR."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=stage.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )


def position_lr_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, k: int) -> None:
    """Put the scheduler at optimizer step ``k``: the next step runs with factor(k)."""
    scheduler.last_epoch = k
    lrs = [base * fn(k) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def resolve_weights_file(path: Path) -> Path:
    """The weights file ``--load`` or ``init_from`` names: a file, a ``final/`` folder's EMA file, or a folder."""
    if path.is_dir() and (path / FINAL_EMA).is_file() and (path / "mmdit_config.json").is_file():
        return path / FINAL_EMA
    return path


class BoostedMMDiT:
    """The boosted model called where an MMDiT is expected (:func:`predict_velocity`): calls go
    through the wrapper (DDP / ZeRO hooks), attributes (``config``, ``cond_in``) come from the MMDiT."""

    def __init__(self, boosted: torch.nn.Module) -> None:
        self.boosted = boosted
        self.module = unwrap_model(boosted)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.boosted(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


# --------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------
class OomGuard:
    """Per-bucket micro-batch limits that halve when a step runs out of memory.

    :meth:`run` calls ``step(micro_batch)``; on ``torch.OutOfMemoryError`` it calls ``free()``,
    halves the bucket's limit for the rest of the run and retries the same batch in smaller
    micro-batches (gradient accumulation keeps the batch, so the data order and the effective
    batch size stay). At micro-batch 1, or when disabled, it raises :class:`OutOfMemory` (exit 4).
    The limits are part of the checkpoint (:meth:`state_dict`).

    With several ranks, DDP keeps one gradient reduction per step (``no_sync`` on all but the last
    micro-batch), so an OOM in the forward pass of one rank is recovered; an OOM inside a
    reduction, or any under ZeRO-2 (which reduces every micro-batch), leaves the other ranks
    waiting and the job ends at the collective timeout (exit 75, retryable).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.limits: dict[str, int] = {}

    def micro_batch(self, bucket: str, batch_size: int) -> int:
        return min(batch_size, self.limits.get(bucket, batch_size))

    def run(self, bucket: str, batch_size: int, step: Callable[[int], T], free: Callable[[], None]) -> T:
        while True:
            micro = self.micro_batch(bucket, batch_size)
            try:
                return step(micro)
            except torch.OutOfMemoryError as exc:
                free()
                if not self.enabled or micro <= 1:
                    raise OutOfMemory(
                        f"out of memory in bucket {bucket} at micro-batch {micro}"
                        + ("" if self.enabled else " (train.oom_guard is off)")
                    ) from exc
                self.limits[bucket] = micro // 2
                log.warning("out of memory in bucket %s: micro-batch %d -> %d", bucket, micro, micro // 2)

    def state_dict(self) -> dict[str, Any]:
        return {"limits": dict(self.limits)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.limits = {str(k): int(v) for k, v in state.get("limits", {}).items()}

    def merge(self, others: list[dict[str, Any]]) -> None:
        """Keep the smallest limit of every bucket over the given states (all ranks' guards)."""
        for state in others:
            for key, value in state.get("limits", {}).items():
                self.limits[key] = min(int(value), self.limits.get(key, int(value)))


def bucket_key(batch: dict[str, Any]) -> str:
    """A batch's bucket as ``resolution/TxHxW`` (the OOM guard's and the FLOP counter's key)."""
    b = batch["bucket"]
    return f"{b.resolution}/{b.num_frames}x{b.height}x{b.width}"


def check_finite(loss: Tensor, step: int, batch: dict[str, Any]) -> None:
    """Raise :class:`NonFiniteLoss` naming the step and the batch when ``loss`` has NaN or inf."""
    if bool(torch.isfinite(loss).all()):
        return
    indices = batch["index"].tolist()
    raise NonFiniteLoss(
        f"non-finite loss at step {step + 1} (values {loss.detach().float().cpu().tolist()[:8]}); "
        f"batch: bucket {bucket_key(batch)}, samples {indices[:8]}, paths {batch['path'][:3]}"
    )


# --------------------------------------------------------------------------------------------
# Final model
# --------------------------------------------------------------------------------------------
def save_final(
    directory: Path,
    model: MMDiT,
    ema: EMA,
    config: dict[str, Any],
    text_encoder: TextEncoder,
    samples_png: Path | None = None,
) -> Path:
    """Write ``final/`` atomically (a temp folder renamed into place); returns the folder.

    model.safetensors (raw weights, fp32), ema.safetensors (the EMA weights), mmdit_config.json,
    config.json (the resolved config), text_encoder.json (its config, name and widths), and the
    last samples as samples.png.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / FINAL_MODEL))
    save_file({k: v.contiguous() for k, v in ema.module_state_dict().items()}, str(tmp / FINAL_EMA))
    mmdit = {**dataclasses.asdict(model.config), "checkpoint_blocks": 0}
    text = {
        **config["diffusion"]["text_encoder"],
        "cache_dir": "",
        "name": text_encoder.name,
        "token_dim": text_encoder.token_dim,
        "pooled_dim": text_encoder.pooled_dim,
    }
    for name, data in (("mmdit_config.json", mmdit), ("config.json", config), ("text_encoder.json", text)):
        (tmp / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
    if samples_png is not None and samples_png.is_file():
        shutil.copy2(samples_png, tmp / "samples.png")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_diffusion_final(path: str | Path, use_ema: bool = True) -> tuple[MMDiT, dict[str, Any]]:
    """A stage's ``final/`` folder -> (the MMDiT in eval mode, its resolved config as a dict)."""
    from opensora_core.inference import load_mmdit_final

    path = Path(path)
    missing = [name for name in FINAL_FILES if not (path / name).is_file()]
    if missing:
        raise InputError(f"{path} is not a diffusion final/ folder: missing {', '.join(missing)}")
    return load_mmdit_final(path, use_ema=use_ema), json.loads((path / "config.json").read_text())


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
@dataclass
class FlowInputs:
    """Every random draw of one step for a batch of B: the model's inputs and the target."""

    x_t: Tensor
    """(B, C, T, H, W) noisy latents."""
    t: Tensor
    """(B,) times, 1 = noise."""
    target: Tensor
    """(B, C, T, H, W) velocity."""
    text: TextEmbeddings
    """Prompt embeddings after condition dropout."""
    cond: Condition
    """Mask (B, 1, T, H, W), masked reference (B, C, T, H, W), loss mask (B, T)."""


@dataclass
class MetricWindow:
    """Sums over the steps since the last log; :meth:`reduce` adds them over the ranks."""

    bins: int
    steps: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    grad_norm_sum: float = 0.0
    img_tokens: int = 0
    tokens: int = 0
    flops: float = 0.0
    cache_hits: int = 0
    bin_sums: Tensor = field(init=False)
    bin_counts: Tensor = field(init=False)
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.bin_sums = torch.zeros(self.bins, dtype=torch.float64)
        self.bin_counts = torch.zeros(self.bins, dtype=torch.float64)

    def add(
        self, losses: Tensor, t: Tensor, grad_norm: float | None, img_tokens: int, txt_tokens: int, hits: int
    ) -> None:
        """One step: per-sample losses (B,) at times t (B,), its grad norm, tokens and cache hits."""
        sums, counts = loss_by_bin(losses, t, self.bins)
        self.steps += 1
        self.loss_sum += float(losses.sum())
        self.samples += len(losses)
        self.grad_norm_sum += grad_norm or 0.0
        self.img_tokens += img_tokens
        self.tokens += img_tokens + txt_tokens
        self.cache_hits += hits
        self.bin_sums += sums.double().cpu()
        self.bin_counts += counts.double().cpu()

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means and rates of the window over every rank (a collective: all ranks call it)."""
        scalars = [self.loss_sum, self.samples, self.grad_norm_sum, self.img_tokens, self.tokens, self.flops]
        packed = torch.cat(
            [torch.tensor([*scalars, self.cache_hits], dtype=torch.float64), self.bin_sums, self.bin_counts]
        )
        values = all_reduce_sum(packed.to(device)).cpu()
        loss_sum, samples, grad_sum, img_tokens, tokens, flops, hits = values[:7].tolist()
        sums, counts = values[7 : 7 + self.bins], values[7 + self.bins :]
        seconds = max(time.perf_counter() - self.start, 1e-9)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        out = {
            "loss": loss_sum / max(samples, 1),
            "grad_norm": grad_sum / max(self.steps, 1),
            "img_tokens_per_s": img_tokens / seconds,
            "tokens_per_s": tokens / seconds,
            "step_time_s": seconds / max(self.steps, 1),
            "cache_hit_rate": hits / max(samples, 1),
            "tflops_per_device": flops / seconds / 1e12 / world,
        }
        for k in range(self.bins):
            if counts[k] > 0:
                out[f"loss_t/{k / self.bins:.1f}-{(k + 1) / self.bins:.1f}"] = float(sums[k] / counts[k])
        return out


class DiffusionTrainer(CheckpointedTrainer):
    """One stage's training: the frozen encoders, the data, the boosted MMDiT, its state and the loop."""

    def __init__(
        self,
        cfg: Config,
        stage: str,
        paths: StagePaths,
        info: DistInfo,
        load: LoadOptions | None = None,
        run: NullRun | None = None,
    ) -> None:
        self.cfg, self.stage, self.paths, self.info = cfg, stage, paths, info
        self.dcfg: DiffusionConfig = cfg.diffusion
        self.scfg = get_stage(cfg.diffusion, stage)
        self.tcfg: TrainConfig = cfg.train
        self.load = load or LoadOptions()
        self.run = run or NullRun()
        self.device = info.device
        self.flow = RectifiedFlow(self.dcfg.flow)

        # 1. frozen VAE and text encoder; the cache they share
        stats = read_latent_stats(paths.latent_stats)
        self.reader = ShardReader(paths.shards, split="train")
        self.vae = build_frozen_vae(paths.vae, stats, self.device)
        self.text_encoder, self.cache = build_stage_encoders(
            self.dcfg, str(stats["vae_sha256"]), self.reader.content_hash, self.device
        )
        self.null_text = self.text_encoder.null_embeddings().to(self.device)

        # 2. data
        set_seed(self.dcfg.seed, info.rank)
        self.patch = MMDIT_SIZES[self.dcfg.model].patch_size
        self.buckets = build_buckets(self.scfg, self.vae.spatial_factor * self.patch)
        videos = VideoDataset(
            self.reader, self.scfg.frame_interval, random_start=self.cache is None, seed=self.dcfg.seed
        )
        sampler = BucketBatchSampler(
            self.reader, self.buckets, info.world_size, info.rank, seed=self.dcfg.seed, drop_last=True
        )
        loader = build_latent_loader(LatentDataset(videos, self.cache), sampler, self.dcfg.num_workers)
        self.loader = InfiniteLoader(loader, sampler)

        # 3. identity of this run -> resume decision
        if self.load.path:
            self.init_path: Path | None = resolve_weights_file(Path(self.load.path))
        else:
            self.init_path = init_weights_path(self.dcfg, stage, paths)
        self.resolved = self._resolved_config(stats)
        self.exclude = RUN_EXCLUDE + tuple(f"diffusion.stages.{n}" for n in self.dcfg.stages if n != stage)
        self.config_hash = resume_config_hash(self.resolved, self.exclude)
        self.resume_path, reason = find_resume_checkpoint(
            paths.ckpt(stage), self.config_hash, self.resolved, self.exclude
        )
        log.info("%s", reason)
        self.run.set_tags({"resume": reason[:250]})

        # 4. model (the same initial weights on every rank), EMA, optimizer, booster
        torch.manual_seed(self.dcfg.seed)
        model = build_model(self.dcfg, self.text_encoder, self.vae.latent_channels, self.device)
        self.load_report: LoadReport | None = None
        if self.resume_path is None and self.init_path is not None and not is_complete(self.init_path):
            # The previous stage's weights fit exactly; released or --load weights may not.
            strict = not self.load.path and previous_stage(self.dcfg, stage) is not None
            self.load_report = self._load_weights(model, self.init_path, strict)
        set_seed(self.dcfg.seed, info.rank)
        self.ema = EMA(model, self.dcfg.ema_decay)
        self.booster = build_booster(self.dcfg.plugin, self.dcfg.precision, self.dcfg.grad_clip)
        optimizer = build_optimizer(model, self.dcfg, self.scfg)
        self.model, self.optimizer, *_ = self.booster.boost(model, optimizer)
        self.mmdit = BoostedMMDiT(self.model)

        # 5. training state: fresh, resumed, or from --load
        self.guard = OomGuard(self.tcfg.oom_guard)
        self.step = 0
        self.warmup_start = 0
        self.history: list[dict[str, float]] = []
        self.resumed_from = ""
        self._restore()
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer,
            self.scfg.warmup_steps,
            max(1, self.scfg.steps - self.warmup_start),
            self.scfg.lr_schedule,
            self.scfg.min_lr_ratio,
        )
        position_lr_scheduler(self.lr_scheduler, self.step - self.warmup_start)
        self.flops: dict[tuple[str, int], float] = {}
        self.count_flops = self.device.type == "cuda" and self.tcfg.peak_tflops > 0

    # ---- setup helpers -----------------------------------------------------------------------
    def _resolved_config(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The config plus what this stage read (hashes), as saved beside checkpoints and final/."""
        init_sha = ""
        if self.init_path is not None and self.init_path.is_file():
            init_sha = broadcast_object(file_sha256(self.init_path) if self.info.rank == 0 else None)
        run = {
            "stage": self.stage,
            "init": str(self.init_path or ""),
            "init_sha256": init_sha,
            "vae_sha256": str(stats["vae_sha256"]),
            "shards_hash": self.reader.content_hash,
            "text_encoder": self.text_encoder.name,
            "load": self.load.spec(),
        }
        return {**self.cfg.to_dict(), "run": run}

    def _load_weights(self, model: MMDiT, path: Path, strict: bool) -> LoadReport:
        """Copy weights by key into the plain model; log the report and keep it with the run."""
        report = load_mmdit_weights(model, path, strict=strict)
        log.info("initial weights: %s", report)
        self.run.log_dict(
            {
                "path": str(path),
                "loaded": len(report.loaded),
                "missing": report.missing,
                "unexpected": report.unexpected,
                "mismatched": [list(map(str, m)) for m in report.mismatched],
            },
            "load_report.json",
        )
        return report

    def _restore(self) -> None:
        """Resume the matching checkpoint, or apply ``--load`` of a checkpoint folder."""
        if self.resume_path is not None:
            # The scheduler is rebuilt from the step and the warmup start, not loaded.
            loaded = self.load_state(self.resume_path, lr_scheduler=None)
            self.resumed_from = str(self.resume_path)
        elif self.load.path and is_complete(self.load.path):
            keep_step = not self.load.reset_step
            load_optimizer = self.load.optimizer is not False
            loaded = self.load_state(
                self.load.path,
                lr_scheduler=None,
                optimizer=self.optimizer if load_optimizer else None,
                sampler=self.loader if keep_step else None,
                load_rng=keep_step,
            )
            log.info(
                "loaded %s (optimizer %s, step %s)",
                self.load.path,
                "loaded" if load_optimizer else "reset",
                loaded.step if keep_step else "reset to 0",
            )
            if not keep_step:
                loaded.step, loaded.extra = 0, {}
        else:
            return
        self.step = loaded.step
        self.guard.load_state_dict(loaded.extra.get("oom_guard", {}))
        self.history = list(loaded.extra.get("history", []))
        self.warmup_start = int(loaded.extra.get("warmup_start", 0))
        if self.load.redo_warmup and self.resume_path is None:
            self.warmup_start = self.step

    # ---- one step ----------------------------------------------------------------------------
    def prepare_inputs(self, x0: Tensor, prompts: list[str]) -> FlowInputs:
        """Draw the step's randomness for latents x0 (B, C, T, H, W): text dropout, conditions, t, noise."""
        b, _, frames, h, w = x0.shape
        te = self.dcfg.text_encoder
        text = self.text_encoder.encode(prompts).to(self.device)
        text, _, _ = drop_conditions(
            text, self.null_text, token_prob=te.token_dropout, pooled_prob=te.pooled_dropout
        )
        conditions = self.scfg.conditions
        types = sample_condition_types(b, conditions.weights, frames, v2v_frames=conditions.v2v_frames)
        cond = build_conditions(types, x0, conditions.v2v_frames)
        t = self.flow.sample_t(b, (h // self.patch) * (w // self.patch), frames, device=self.device)
        noise = torch.randn_like(x0)
        x_t, target = self.flow.prepare_inputs(x0, noise, t)
        return FlowInputs(x_t, t, target, text, cond)

    def forward_backward(self, inputs: FlowInputs, micro: int, batch: dict[str, Any]) -> Tensor:
        """Loss and gradients of the batch in micro-batches of ``micro``; per-sample losses (B,)."""
        b = inputs.x_t.shape[0]
        losses = []
        starts = list(range(0, b, micro))
        for i, lo in enumerate(starts):
            part = slice(lo, lo + micro)
            last = i == len(starts) - 1
            sync = (
                contextlib.nullcontext()
                if last or self.dcfg.plugin == "zero2"
                else self.booster.no_sync(self.model, self.optimizer)
            )
            with sync:
                c = inputs.cond
                pred = predict_velocity(
                    self.mmdit,
                    inputs.x_t[part],
                    inputs.t[part],
                    inputs.text.select(part),
                    c.mask[part],
                    c.masked_ref[part],
                )
                loss = self.flow.loss(pred, inputs.target[part], c.loss_mask[part])
                check_finite(loss, self.step, batch)
                self.booster.backward(loss.sum() / b, self.optimizer)
            losses.append(loss.detach())
        return torch.cat(losses)

    def free_memory(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def train_step(self, batch: dict[str, Any], window: MetricWindow) -> Tensor:
        """One optimizer step on a collated batch; adds to ``window``; returns per-sample losses (B,)."""
        # 1. latents (cache or VAE) and the step's random draws
        raw = encode_batch_latents(batch, self.vae, self.cache, self.scfg.frame_interval)
        x0 = self.vae.normalize_latents(raw)
        inputs = self.prepare_inputs(x0, batch["text"])
        # 2. forward and backward under the OOM guard (FLOPs counted once per shape on GPU)
        key = bucket_key(batch)
        counting = self.count_flops and (key, len(x0)) not in self.flops
        with _flop_counter(counting) as counter:
            losses = self.guard.run(
                key, len(x0), lambda micro: self.forward_backward(inputs, micro, batch), self.free_memory
            )
        if counting:
            self.flops[(key, len(x0))] = float(counter.get_total_flops())
        # 3. update: clip, step, schedule, EMA
        grad_norm = maybe_clip_grad_norm(self.optimizer, self.dcfg.plugin, self.dcfg.grad_clip)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"non-finite gradient norm at step {self.step + 1} (bucket {key})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        n = self.ema.num_updates
        self.ema.update(self.model, decay=min(self.dcfg.ema_decay, (1 + n) / (10 + n)))
        self.step += 1
        # 4. bookkeeping
        b, _, frames, h, w = x0.shape
        img_tokens = b * frames * (h // self.patch) * (w // self.patch)
        hits = sum(z is not None for z in batch["latents"])
        window.add(losses, inputs.t, grad_norm, img_tokens, b * inputs.text.tokens.shape[1], hits)
        window.flops += self.flops.get((key, len(x0)), 0.0)
        return losses

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Train to ``steps``, then write final/; returns the summary (also metrics/diffusion_NAME.json)."""
        start, first_step = time.perf_counter(), self.step
        rank0 = self.info.rank == 0
        window = MetricWindow(self.dcfg.loss_bins)
        samples_png, sampled_at = None, -1
        bar = tqdm(
            total=self.scfg.steps,
            initial=self.step,
            desc=f"diffusion {self.stage}",
            disable=not (rank0 and progress),
        )
        with _maybe_profiler(self.tcfg, self.run, rank0) as profiler:
            while self.step < self.scfg.steps:
                losses = self.train_step(next(self.loader), window)
                bar.update(1)
                bar.set_postfix(loss=f"{float(losses.mean()):.4f}")
                if profiler is not None:
                    profiler.step()
                last = self.step == self.scfg.steps
                if self.step % self.dcfg.log_every == 0 or last:
                    self._log(window)
                    window = MetricWindow(self.dcfg.loss_bins)
                if rank0 and self.dcfg.sample_every and self.step % self.dcfg.sample_every == 0:
                    samples_png, sampled_at = self.log_samples(), self.step
                if self.step % self.dcfg.ckpt_every == 0 or last:
                    self.save()
        bar.close()
        summary = self._summary(time.perf_counter() - start, self.step - first_step)
        if rank0:
            if sampled_at != self.step:
                samples_png = self.log_samples()
            final = self.paths.final(self.stage)
            save_final(
                final, unwrap_model(self.model), self.ema, self.resolved, self.text_encoder, samples_png
            )
            write_loss_csv(self.paths.loss_csv(self.stage), self.history)
            self.paths.summary(self.stage).write_text(json.dumps(summary, indent=2) + "\n")
            self.run.log_metrics({"final_loss": summary["final_loss"]}, step=self.step)
        return summary

    def save(self) -> Path:
        """A checkpoint of the whole state at the current step (every rank calls it)."""
        states = [self.guard.state_dict()]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, self.guard.state_dict())
        self.guard.merge(states)
        extra = {
            "oom_guard": self.guard.state_dict(),
            "history": self.history,
            "warmup_start": self.warmup_start,
        }
        return self.save_state(self.paths.ckpt(self.stage), extra, self.dcfg.keep_last_n)

    def _log(self, window: MetricWindow) -> None:
        metrics = window.reduce(self.device)
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        if self.count_flops:
            metrics["mfu"] = metrics["tflops_per_device"] / self.tcfg.peak_tflops
        else:
            metrics.pop("tflops_per_device")
        from opensora_core.training.vae_trainer import peak_memory_mb

        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
        if self.info.rank != 0:
            return
        self.run.log_metrics(metrics, step=self.step)
        row = {
            "step": self.step,
            "loss": metrics["loss"],
            "lr": metrics["lr"],
            "grad_norm": metrics["grad_norm"],
        }
        self.history.append(row)
        write_loss_csv(self.paths.loss_csv(self.stage), self.history)

    @torch.no_grad()
    def log_samples(self) -> Path | None:
        """Rank 0: a PNG of EMA samples at fixed seeds (rows: prompts, columns: frames), logged to MLflow."""
        from opensora_core.training.vae_trainer import save_frame_grid

        prompts = sample_prompts(self.paths.shards, self.dcfg.num_samples)
        if not prompts:
            return None
        frames, height, width = sample_shape(self.buckets)
        shape = self.vae.latent_shape(frames, height, width)
        # Building the sampling copy draws initial weights: keep the training RNG streams untouched.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model = build_mmdit(unwrap_model(self.model).config, device=self.device, checkpoint_blocks=0)
        self.ema.copy_to(model.eval())
        noise = prepare_noise(list(range(len(prompts))), shape, self.device)
        opts = SamplingOptions(num_steps=self.dcfg.sample_num_steps, guidance=self.dcfg.sample_guidance)
        text = self.text_encoder.encode(prompts).to(self.device)
        latents = sample_euler(model, noise, text, self.null_text, opts, self.dcfg.flow)
        del model
        video = self.vae.decode(latents.to(next(self.vae.parameters()).dtype)).float().cpu()
        out = Path(tempfile.mkdtemp(prefix="opensora-samples-")) / f"samples-step-{self.step:06d}.png"
        save_frame_grid(list(video), out, max_frames=8)
        self.run.log_artifact(out, "samples")
        return out

    def _summary(self, seconds: float, steps_run: int) -> dict[str, Any]:
        recent = [row["loss"] for row in self.history[-5:]]
        return {
            "stage": self.stage,
            "steps": self.step,
            "steps_run": steps_run,
            "final_loss": float(np.mean(recent)) if recent else float("nan"),
            "first_loss": self.history[0]["loss"] if self.history else float("nan"),
            "train_seconds": round(seconds, 2),
            "resumed_from": self.resumed_from,
            "init": self.resolved["run"]["init"],
            "oom_limits": self.guard.limits,
        }


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    """The loss curve (step, loss, lr, grad_norm) as CSV, for ``dvc plots``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "grad_norm"])
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def sample_prompts(shards: Path, n: int) -> list[str]:
    """The captions of the first ``n`` held-out rows (training rows when there is no ``val`` split)."""
    if n <= 0:
        return []
    try:
        reader = ShardReader(shards, split="val")
    except InputError:
        reader = ShardReader(shards, split="train")
    return [str(reader[i]["text"]) for i in range(min(n, len(reader)))]


def sample_shape(buckets: Buckets) -> tuple[int, int, int]:
    """(T, H, W) of the samples: the stage's largest square bucket (else its largest)."""
    every = buckets.all()
    square = [b for b in every if b.height == b.width]
    return (square or every)[0].shape


@contextlib.contextmanager
def _flop_counter(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        yield counter


@contextlib.contextmanager
def _maybe_profiler(tcfg: TrainConfig, run: NullRun, rank0: bool) -> Iterator[Any]:
    """``train.profile_steps`` > 0: a torch.profiler trace of that many steps, logged as an artifact."""
    if tcfg.profile_steps <= 0:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    out = Path(tempfile.mkdtemp(prefix="opensora-trace-"))
    traces: list[Path] = []

    def export(prof: Any) -> None:
        path = out / f"trace-rank{int(os.environ.get('RANK', 0)):03d}-step{prof.step_num}.json"
        prof.export_chrome_trace(str(path))
        traces.append(path)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    plan = schedule(wait=tcfg.profile_wait, warmup=1, active=tcfg.profile_steps, repeat=1)
    with profile(activities=activities, schedule=plan, on_trace_ready=export, record_shapes=True) as prof:
        yield prof
    if not traces:
        log.warning(
            "train.profile_steps: the run ended before the profiler's %d steps",
            tcfg.profile_wait + 1 + tcfg.profile_steps,
        )
    elif rank0:
        for path in traces:
            run.log_artifact(path, "profiler")
        log.info("profiler trace: %s", ", ".join(map(str, traces)))


# --------------------------------------------------------------------------------------------
# The job's body
# --------------------------------------------------------------------------------------------
def train_stage(
    cfg: Config,
    stage: str,
    paths: StagePaths,
    info: DistInfo,
    load: LoadOptions | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``stage`` on this rank (every rank calls it); returns the summary."""
    load = load or LoadOptions()
    validate_stage(cfg, stage, paths, load)
    params = {"stage": stage, "diffusion": cfg.to_dict()["diffusion"], "train": dataclasses.asdict(cfg.train)}
    params["diffusion"]["stages"] = {stage: params["diffusion"]["stages"][stage]}
    tags = {"diffusion.stage": stage, "world_size": info.world_size, "device": info.device.type}
    with start_stage_run(f"diffusion_{stage}", cfg.tracking, params=params, tags=tags, rank=info.rank) as run:
        trainer = DiffusionTrainer(cfg, stage, paths, info, load, run)
        summary = trainer.fit(progress)
        run.log_artifact(paths.loss_csv(stage))
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the stage CLI."""
    resumed = f", resumed from {Path(summary['resumed_from']).name}" if summary.get("resumed_from") else ""
    loss = summary["final_loss"]
    loss_text = f"{loss:.4f}" if math.isfinite(loss) else "n/a"
    return (
        f"{summary['stage']}: {summary['steps']} steps ({summary['steps_run']} run{resumed}), "
        f"final loss {loss_text}, {summary['train_seconds']:.0f}s training"
    )
