"""The one checkpoint helper of every training job: atomic save, resume selection, load, pruning.

A checkpoint is a folder ``<ckpt_dir>/step-NNNNNNNN/``::

    model.pt          weights (through the Booster when one is given, so ZeRO works); with
                      ``trainable_only`` (LoRA) only the parameters that train, the frozen base
                      is not copied (its sha256 is in meta.json as ``base_sha256``)
    optimizer.pt      optimizer state (gathered by the Booster from ZeRO shards)
    lr_scheduler.pt   LR scheduler state
    ema.pt            EMA shadow weights (fp32)
    trainer_state.pt  step, data sampler state, extra job state
    rng/rank-NNNNN.pt every rank's python / numpy / torch / CUDA RNG states
    config.json       the resolved configuration
    meta.json         step, config hash, world size, time
    files.json        size and sha256 of every file above (checkpoint_files.py)
    COMPLETE          written last

Atomicity: every rank writes into ``.tmp-step-NNNNNNNN/`` beside it (all ranks call
:func:`save_checkpoint`; each writes its own RNG file), a barrier, then rank 0 fsyncs the files,
writes ``COMPLETE`` and renames the folder into place. A crash at any point leaves either the
previous checkpoints only or a complete new one: folders without ``COMPLETE`` or with another name
are never resumed. With several nodes ``ckpt_dir`` must be on a shared filesystem.

A write that fails for want of space removes the temp folder and raises DiskFull (exit 74): the
previous checkpoints stay as they were.

Resume: :func:`find_resume_checkpoint` picks the latest complete checkpoint whose key
(:func:`~opensora_core.training.run_key.resume_config_hash` of the resolved config, code and data
hashes: see :mod:`~opensora_core.training.run_key`) equals the current one and whose files match
``files.json``; a truncated or corrupt one is skipped with a warning naming the file, for the
previous complete one. Otherwise it says why the run starts fresh.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from opensora_core.distributed.booster import unwrap_model, unwrap_optimizer
from opensora_core.distributed.dist import barrier, get_rank, get_rng_states, get_world_size, set_rng_states
from opensora_core.errors import InputError
from opensora_core.training.checkpoint_files import (
    disk_full_error,
    is_write_failure,
    maybe_hold,
    verify_checkpoint,
    write_file_manifest,
)
from opensora_core.training.run_key import RESUME_EXCLUDE, config_diff, resume_config_hash, to_config_dict

log = logging.getLogger("opensora.checkpoint")

COMPLETE = "COMPLETE"
_NAME_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored, plus the job state the caller applies itself."""

    path: Path
    step: int
    config_hash: str
    sampler_state: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint folder name, or None when it is not one."""
    match = _NAME_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return checkpoint_step(path) is not None and (path / COMPLETE).is_file()


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def find_resume_checkpoint(
    ckpt_dir: str | Path,
    config_hash: str,
    config: Any = None,
    exclude: tuple[str, ...] = RESUME_EXCLUDE,
) -> tuple[Path | None, str]:
    """The latest complete checkpoint saved with ``config_hash``, and a readable reason.

    When none matches, the reason names the newest checkpoint's hash and, if the current
    ``config`` is given, the keys that differ from the config saved beside it.
    """
    ckpt_dir = Path(ckpt_dir)
    complete = list_checkpoints(ckpt_dir)
    if not complete:
        partial = [p.name for p in ckpt_dir.glob("*") if p.is_dir()] if ckpt_dir.is_dir() else []
        extra = (
            f" ({len(partial)} incomplete folder(s) ignored: {', '.join(sorted(partial)[:3])})"
            if partial
            else ""
        )
        return None, f"no complete checkpoint in {ckpt_dir}{extra}; starting fresh"
    skipped, corrupt = [], []
    for path in reversed(complete):
        saved = _saved_hash(path)
        problems = ["meta.json unreadable"] if saved is None else []
        if saved == config_hash:
            problems = verify_checkpoint(path)
        if problems:
            log.warning("skipping corrupt checkpoint %s: %s", path, "; ".join(problems[:3]))
            corrupt.append(f"{path.name} ({problems[0]})")
        elif saved == config_hash:
            note = f"; newer {', '.join(skipped)} saved with another config" if skipped else ""
            note += f"; skipped corrupt {', '.join(corrupt)}" if corrupt else ""
            return path, f"resuming from {path} (step {checkpoint_step(path)}){note}"
        else:
            skipped.append(path.name)
    if corrupt and not skipped:
        return None, f"every checkpoint in {ckpt_dir} is corrupt ({', '.join(corrupt)}); starting fresh"
    latest = next(p for p in reversed(complete) if p.name == skipped[0])
    saved = _saved_hash(latest) or ""
    reason = (
        f"resume key {config_hash[:12]} (config, code, data) differs from every checkpoint in {ckpt_dir} "
        f"(latest {latest.name}: {saved[:12]})"
    )
    if config is not None and (latest / "config.json").is_file():
        changes = config_diff(json.loads((latest / "config.json").read_text()), config, exclude)
        if changes:
            more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
            reason += f"; changed: {'; '.join(changes[:5])}{more}"
    return None, reason + "; starting fresh"


def _saved_hash(path: Path) -> str | None:
    """The config hash in ``meta.json``, or None when the file cannot be read."""
    try:
        return str(read_meta(path).get("config_hash", ""))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: Any = None,
    lr_scheduler: Any = None,
    ema: Any = None,
    sampler: Stateful | Mapping[str, Any] | None = None,
    booster: Any = None,
    config: Any = None,
    config_hash: str | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last_n: int = 0,
    exclude: tuple[str, ...] = RESUME_EXCLUDE,
    trainable_only: bool = False,
    base_sha256: str = "",
) -> Path:
    """Write ``<ckpt_dir>/step-NNNNNNNN/`` atomically; every rank must call it. Returns the folder.

    ``model`` / ``optimizer`` go through ``booster.save_model`` / ``save_optimizer`` when a
    Booster is given, else rank 0 ``torch.save``s the unwrapped state dicts. ``sampler`` is an
    object with ``state_dict()`` or a plain mapping. ``config_hash`` defaults to
    :func:`resume_config_hash` of ``config``. ``keep_last_n > 0`` deletes older checkpoints.
    ``trainable_only`` writes only the parameters with ``requires_grad`` into model.pt (a LoRA
    adapter; parameters are replicated under ddp and zero2, so rank 0 writes them) and records
    ``base_sha256``, the frozen weights' hash, in meta.json.
    """
    ckpt_dir = Path(ckpt_dir)
    rank = get_rank()
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f"{_TMP_PREFIX}{final.name}"
    if config_hash is None:
        config_hash = resume_config_hash(config, exclude) if config is not None else ""

    # 1. Rank 0 clears leftovers of an interrupted save and makes the temp folder.
    if rank == 0:
        _fresh_tmp(ckpt_dir, tmp)
    barrier()
    try:
        _write_parts(
            tmp,
            step,
            config_hash,
            model,
            optimizer,
            lr_scheduler,
            ema,
            sampler,
            booster,
            config,
            extra,
            trainable_only=trainable_only,
            base_sha256=base_sha256,
        )
        barrier()
        # 5. Rank 0 makes it durable, lists sizes and hashes, marks it complete, renames it into place.
        if rank == 0:
            _fsync_tree(tmp)
            write_file_manifest(tmp)
            maybe_hold(tmp, step)
            _write_synced(tmp / COMPLETE, f"step {step}\nconfig_hash {config_hash}\n")
            _publish(tmp, final)
    except (OSError, RuntimeError) as exc:
        if not is_write_failure(exc):
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(ckpt_dir)
        raise disk_full_error(exc, ckpt_dir, step, str(previous[-1]) if previous else "") from exc
    if rank == 0:
        if keep_last_n > 0:
            prune_checkpoints(ckpt_dir, keep_last_n)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def _write_parts(
    tmp: Path,
    step: int,
    config_hash: str,
    model: torch.nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    ema: Any,
    sampler: Any,
    booster: Any,
    config: Any,
    extra: Mapping[str, Any] | None,
    trainable_only: bool = False,
    base_sha256: str = "",
) -> None:
    """Steps 2-4 of :func:`save_checkpoint`: every part of the state into ``tmp``."""
    rank, world_size = get_rank(), get_world_size()
    # 2. Model and optimizer: collectives under ZeRO, so every rank takes part.
    _save_model_and_optimizer(tmp, model, optimizer, booster, rank, trainable_only)
    # 3. Replicated state: rank 0 writes it once.
    if rank == 0:
        sampler_state = sampler.state_dict() if hasattr(sampler, "state_dict") else sampler
        trainer_state = {"step": step, "sampler": sampler_state, "extra": dict(extra or {})}
        meta = {
            "step": step,
            "config_hash": config_hash,
            "world_size": world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if trainable_only:
            meta |= {"trainable_only": True, "base_sha256": base_sha256}
        _save_replicated(tmp, trainer_state, meta, lr_scheduler=lr_scheduler, ema=ema, config=config)
    # 4. Every rank its own RNG states.
    torch.save(get_rng_states(), tmp / "rng" / f"rank-{rank:05d}.pt")


def _fresh_tmp(ckpt_dir: Path, tmp: Path) -> None:
    """Remove the leftovers of interrupted saves and make an empty ``tmp`` with its ``rng/``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in ckpt_dir.glob(f"{_OLD_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    (tmp / "rng").mkdir(parents=True)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's parameters that train (``requires_grad``), detached, on CPU."""
    return {n: p.detach().cpu() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}


def _save_model_and_optimizer(
    tmp: Path, model: torch.nn.Module, optimizer: Any, booster: Any, rank: int, trainable_only: bool = False
) -> None:
    """Through the Booster on every rank (ZeRO gathers shards), else ``torch.save`` on rank 0."""
    if trainable_only:
        if rank == 0:
            torch.save(trainable_state_dict(model), tmp / "model.pt")
        model = None  # the optimizer below still goes through the Booster
    if booster is not None:
        if model is not None:
            booster.save_model(model, str(tmp / "model.pt"))
        if optimizer is not None:
            booster.save_optimizer(optimizer, str(tmp / "optimizer.pt"))
        return
    if rank == 0 and model is not None:
        torch.save(unwrap_model(model).state_dict(), tmp / "model.pt")
    if rank == 0 and optimizer is not None:
        torch.save(unwrap_optimizer(optimizer).state_dict(), tmp / "optimizer.pt")


def _save_replicated(
    tmp: Path,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    *,
    lr_scheduler: Any = None,
    ema: Any = None,
    config: Any = None,
) -> None:
    """Rank 0's files: scheduler, EMA, trainer state, the resolved config and ``meta.json``."""
    if lr_scheduler is not None:
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    if ema is not None:
        torch.save(ema.state_dict(), tmp / "ema.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(to_config_dict(config), indent=2, default=str))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder to its final name (replacing a same-step checkpoint)."""
    old = None
    if final.exists():
        old = final.with_name(f"{_OLD_PREFIX}{final.name}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(ckpt_dir: str | Path, keep_last_n: int) -> list[Path]:
    """Delete all but the ``keep_last_n`` newest complete checkpoints; returns the deleted ones."""
    if keep_last_n <= 0:
        return []
    doomed = list_checkpoints(ckpt_dir)[:-keep_last_n]
    for path in doomed:
        # Rename first so a crash mid-delete never leaves a half-deleted folder that looks complete.
        trash = path.with_name(f"{_OLD_PREFIX}{path.name}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: Any = None,
    lr_scheduler: Any = None,
    ema: Any = None,
    sampler: Stateful | None = None,
    booster: Any = None,
    load_rng: bool = True,
    strict: bool = True,
    trainable_only: bool = False,
    base_sha256: str = "",
) -> LoadedCheckpoint:
    """Restore what :func:`save_checkpoint` wrote into the given objects; every rank calls it.

    Objects left as None are not restored. This rank's RNG states are restored last (when
    ``load_rng`` and a file for this rank exists: a different world size keeps fresh streams).
    ``trainable_only``: model.pt holds only the trained parameters (a LoRA adapter) and the model
    already carries its base weights; a ``base_sha256`` other than the one saved is an error.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    if trainable_only:
        _load_trainable(path, model, base_sha256)
        model = None
    if booster is not None:
        if model is not None:
            booster.load_model(model, str(path / "model.pt"), strict=strict)
        if optimizer is not None:
            booster.load_optimizer(optimizer, str(path / "optimizer.pt"))
    else:
        if model is not None:
            unwrap_model(model).load_state_dict(_load(path / "model.pt"), strict=strict)
        if optimizer is not None:
            unwrap_optimizer(optimizer).load_state_dict(_load(path / "optimizer.pt"))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(_load(path / "lr_scheduler.pt"))
    if ema is not None:
        ema.load_state_dict(_load(path / "ema.pt"))
    state = _load(path / "trainer_state.pt")
    if sampler is not None and state.get("sampler") is not None:
        sampler.load_state_dict(state["sampler"])
    if load_rng:
        rng_file = path / "rng" / f"rank-{get_rank():05d}.pt"
        if rng_file.is_file():
            set_rng_states(_load(rng_file))
        else:
            log.warning(
                "%s has no RNG state for rank %d (world size changed?); keeping fresh RNG", path, get_rank()
            )
    meta = read_meta(path)
    return LoadedCheckpoint(
        path, int(state["step"]), meta.get("config_hash", ""), state.get("sampler"), state.get("extra", {})
    )


def _load_trainable(path: Path, model: torch.nn.Module, base_sha256: str) -> None:
    """Copy model.pt's trained parameters into ``model``; exactly its trainable ones must be there."""
    meta = read_meta(path)
    saved_base = meta.get("base_sha256", "")
    if not meta.get("trainable_only"):
        raise InputError(f"{path} holds a whole model, not only its trained parameters")
    if base_sha256 and saved_base and saved_base != base_sha256:
        raise InputError(
            f"{path} was trained on base {saved_base[:12]}, this model's base is {base_sha256[:12]}"
        )
    state = _load(path / "model.pt")
    params = dict(unwrap_model(model).named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(state) != wanted:
        raise InputError(
            f"{path}: trained parameters differ from the model's: {sorted(set(state) ^ wanted)[:5]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointedTrainer:
    """Save and restore of a trainer's state in this module's format, shared by the trainers.

    A subclass sets ``model``, ``optimizer``, ``lr_scheduler``, ``ema``, ``loader`` (the stateful
    batch source), ``booster``, ``step``, ``resolved`` (its resolved config) and ``config_hash``.
    """

    model: Any
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    loader: Any
    booster: Any
    step: int
    resolved: Any
    config_hash: str
    trainable_only: bool = False
    """Checkpoints hold only the parameters that train (LoRA); the base is rebuilt from its file."""
    base_sha256: str = ""
    """sha256 of the frozen base weights, recorded in (and checked against) trainable-only checkpoints."""

    def checkpoint_parts(self) -> dict[str, Any]:
        """The objects a checkpoint holds, as the keyword arguments of save/load_checkpoint (a
        part the trainer has not built yet is None)."""
        names = {"model": "model", "optimizer": "optimizer", "lr_scheduler": "lr_scheduler"}
        names |= {"ema": "ema", "sampler": "loader", "booster": "booster"}
        parts = {key: getattr(self, attr, None) for key, attr in names.items()}
        return parts | {"trainable_only": self.trainable_only, "base_sha256": self.base_sha256}

    def save_state(self, ckpt_dir: str | Path, extra: Mapping[str, Any], keep_last_n: int) -> Path:
        """:func:`save_checkpoint` of every part at ``self.step``; every rank calls it."""
        return save_checkpoint(
            ckpt_dir,
            self.step,
            **self.checkpoint_parts(),
            config=self.resolved,
            config_hash=self.config_hash,
            extra=extra,
            keep_last_n=keep_last_n,
        )

    def load_state(self, path: str | Path, **overrides: Any) -> LoadedCheckpoint:
        """:func:`load_checkpoint` into every part; ``overrides`` replace parts (None skips one)
        or set ``load_rng`` / ``strict``."""
        return load_checkpoint(path, **{**self.checkpoint_parts(), **overrides})
