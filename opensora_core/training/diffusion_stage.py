"""A diffusion stage's wiring: where it reads and writes, what it starts from, its buckets, model,
optimizer and encoders, and the checks run before a job is launched.

Everything here is built once per stage by :class:`opensora_core.training.diffusion_trainer.DiffusionTrainer`
(and :func:`validate_stage` by the stage CLI, before torchrun starts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opensora_core.config import Config, DiffusionConfig, DiffusionStageConfig, LoraConfig
from opensora_core.data.buckets import Buckets
from opensora_core.diffusion.conditions import Condition
from opensora_core.distributed.booster import unwrap_model
from opensora_core.errors import ConfigError, InputError
from opensora_core.models.final import FINAL_EMA, REGISTRY_WEIGHTS, registry_cache_dir, resolve_weights_file
from opensora_core.models.lora import apply_lora, count_parameters, load_adapter_state, read_adapter
from opensora_core.models.mmdit import MMDIT_SIZES, MMDiT, build_mmdit, load_mmdit_weights
from opensora_core.models.mmdit.loader import IncompatibleWeights, LoadReport, check_mmdit_weights
from opensora_core.models.text.encoders import (
    CachedTextEncoder,
    TextEmbeddings,
    TextEncoder,
    build_text_encoder_from_config,
)
from opensora_core.tracking import NullRun
from opensora_core.training.checkpoint import RESUME_EXCLUDE, is_complete
from opensora_core.training.checkpoint_files import verify_checkpoint
from opensora_core.training.latent_cache import LatentCache

log = logging.getLogger("opensora.diffusion")


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

    def loss_png(self, stage: str) -> Path:
        return self.metrics / f"diffusion_{stage}_loss.png"

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


def get_stage(cfg: DiffusionConfig, stage: str) -> DiffusionStageConfig:
    """The settings of ``stage``; ConfigError listing the stages when it is not one."""
    if stage not in cfg.stages:
        raise ConfigError(
            f"unknown diffusion stage {stage!r}; stages in diffusion.stages: {', '.join(cfg.stages)}"
        )
    return cfg.stages[stage]


def previous_stage(cfg: DiffusionConfig, stage: str) -> str | None:
    """The stage before ``stage`` in ``diffusion.stages``, or None for the first."""
    get_stage(cfg, stage)  # an unknown name is a ConfigError (exit 2) listing the stages
    names = list(cfg.stages)
    position = names.index(stage)
    return names[position - 1] if position > 0 else None


def init_weights_path(cfg: DiffusionConfig, stage: str, paths: StagePaths) -> Path | None:
    """What a stage starts from: the previous stage's final EMA weights, else ``diffusion.init_from``
    (a registry URI: the copy the stage CLI downloaded under ``cache_dir`` first)."""
    prev = previous_stage(cfg, stage)
    adapter = previous_adapter(cfg, stage, paths)
    if adapter is not None:  # LoRA after LoRA: the same base, the adapter trains on
        return Path(json.loads((adapter / "adapter.json").read_text())["base"]["path"])
    if prev is not None:
        return paths.final(prev) / FINAL_EMA
    if not cfg.init_from:
        return None
    if is_registry_uri(cfg.init_from):
        return registry_init_dir(cfg) / REGISTRY_WEIGHTS
    return resolve_weights_file(Path(cfg.init_from))


def previous_adapter(cfg: DiffusionConfig, stage: str, paths: StagePaths) -> Path | None:
    """The previous stage's ``final/adapter/`` when both it and ``stage`` are LoRA stages: the
    stage then adapts the same base and starts from that adapter; else None."""
    prev = previous_stage(cfg, stage)
    if prev is None or not cfg.stages[stage].lora.enabled:
        return None
    adapter = paths.final(prev) / "adapter"
    return adapter if (adapter / "adapter.json").is_file() else None


def is_registry_uri(spec: str) -> bool:
    return spec.startswith("models:/")


def registry_init_dir(cfg: DiffusionConfig) -> Path:
    """Where a registry ``init_from`` is kept (``fetch_init_weights`` of opensora_core.inference
    fills it before the job starts): its bundle, ``mmdit.safetensors`` and ``source.json``."""
    return registry_cache_dir(cfg.cache_dir, cfg.init_from)


def base_reference(init_path: Path | None, sha256: str) -> dict[str, str]:
    """What a fine-tune starts from, for adapter.json and the registry tags: the weights' sha256
    and path, plus the registered name and version when they came from the registry."""
    if init_path is None:
        return {}
    ref = {"sha256": sha256, "path": str(init_path)}
    source = init_path.parent / "source.json"
    if source.is_file():
        known = json.loads(source.read_text())
        ref |= {k: str(known[k]) for k in ("model_name", "version", "run_id", "uri") if k in known}
    return ref


def check_lora_stage(cfg: DiffusionConfig, stage_cfg: DiffusionStageConfig, init: Path | None) -> None:
    """LoRA needs a base that fits: ConfigError for no base or an unknown target module, InputError
    (:class:`IncompatibleWeights`) when the base's tensors do not fit the configured MMDiT size."""
    from opensora_core.models.lora import lora_target_names

    if init is None:
        raise ConfigError(
            "lora.enabled needs a base to adapt: set diffusion.init_from (a file, a final/ folder or "
            "models:/NAME@ALIAS) for the first stage, or enable LoRA on a later stage"
        )
    meta_model = build_mmdit(cfg.model, device="meta")
    lora_target_names(meta_model, stage_cfg.lora.target_modules)
    if init.exists() and not is_complete(init):  # a checkpoint folder is checked when it loads
        report = check_mmdit_weights(meta_model, init)
        if report.mismatched or report.missing:
            raise IncompatibleWeights(report)


def validate_stage(cfg: Config, stage: str, paths: StagePaths, load: LoadOptions | None = None) -> None:
    """Check what a stage needs before launching it: ConfigError (bad settings) or InputError (a path)."""
    stage_cfg = get_stage(cfg.diffusion, stage)
    if cfg.diffusion.model not in MMDIT_SIZES:
        raise ConfigError(f"unknown diffusion.model {cfg.diffusion.model!r}; sizes: {', '.join(MMDIT_SIZES)}")
    build_buckets(stage_cfg, spatial_factor=16)  # the bucket table parses
    if load is not None and load.path and load.optimizer and not is_complete(load.path):
        raise ConfigError(f"--load-optimizer needs a checkpoint folder; {load.path} holds weights only")
    if load is not None and load.path and is_complete(load.path):
        problems = verify_checkpoint(load.path)
        if problems:
            raise InputError(f"--load {load.path} is corrupt: {'; '.join(problems[:3])}")
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
        what = (
            f"initial weights (run diffusion_{prev})"
            if prev
            else f"diffusion.init_from {cfg.diffusion.init_from!r}"
        )
        needed[what] = init
    for what, path in needed.items():
        if not path.exists():
            raise InputError(f"{what}: {path} not found")
    if stage_cfg.lora.enabled:
        check_lora_stage(cfg.diffusion, stage_cfg, Path(load.path) if load and load.path else init)


def build_buckets(stage_cfg: DiffusionStageConfig, spatial_factor: int) -> Buckets:
    """The stage's bucket set; sides are multiples of ``spatial_factor`` (VAE factor x patch size)."""
    return Buckets.from_config(
        stage_cfg.buckets,
        spatial_factor=spatial_factor,
        max_upscale=stage_cfg.max_upscale,
        frame_interval=stage_cfg.frame_interval,
        stills_from_videos=stage_cfg.stills_from_videos,
    )


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


def apply_stage_lora(
    model: MMDiT, cfg: LoraConfig, seed: int, init_adapter: Path | None, run: NullRun
) -> list[str]:
    """Wrap ``model`` with the stage's LoRA adapters (A drawn under ``seed``, the same on every
    rank; ``init_adapter``'s tensors instead when given) and freeze the rest; returns the targets."""
    torch.manual_seed(seed)
    targets = apply_lora(model, cfg)
    if init_adapter is not None:
        load_adapter_state(model, read_adapter(init_adapter)[0])
    trainable, total = count_parameters(model)
    log.info(
        "LoRA rank %d on %d modules%s: %d of %d parameters train (%.2f%%)",
        cfg.rank,
        len(targets),
        f" (from {init_adapter})" if init_adapter else "",
        trainable,
        total,
        100 * trainable / total,
    )
    run.log_metrics({"lora_trainable_fraction": trainable / total})
    return targets


def load_initial_weights(model: MMDiT, path: Path, strict: bool, run: NullRun) -> LoadReport:
    """Copy weights by key into the plain model; log the report and keep it with the run."""
    report = load_mmdit_weights(model, path, strict=strict)
    log.info("initial weights: %s", report)
    run.log_dict(
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
