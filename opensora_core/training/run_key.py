"""The resume key of a training stage: its resolved config, its code and its input data.

A checkpoint is resumed only by the run that was interrupted. Its key (``meta.json``'s
``config_hash``) is :func:`resume_config_hash` of the stage's resolved config, which holds

- the config sections the stage reads, less :data:`RESUME_EXCLUDE` (step counts, logging...);
- ``code``: :func:`code_fingerprint`, the sha256 of every file of the stage's code deps as
  ``dvc.yaml`` lists them (the deps under ``opensora_core/`` and ``tasks/``; a folder counts file by
  file, ``__pycache__`` aside), so whatever change makes DVC rerun the stage also changes the key;
- the data: the hashes the stage reads anyway, never a walk over a data folder: the shard
  manifest's ``content_hash``, the VAE's and the initial weights' sha256.

A stage that is not in ``dvc.yaml`` (or a package without it) hashes all of ``opensora_core/``
and ``tasks/``: more than needed, never less. A changed key starts fresh and the log names what
changed (``code.opensora_core/training/vae_trainer.py: ... -> ...``).

A run that reached its end writes ``FINISHED.json`` (key, step) into its checkpoint folder. A
later run of the same key and no more steps is a rerun that DVC was asked for (``dvc repro
--force``, or a dep outside the key): it trains again from step 0. More steps resume (a longer
run continues a shorter one). No FINISHED marker means the run was interrupted: it resumes.

Old checkpoints are never mixed with a new run: when a run starts fresh, the checkpoints in the
folder (and its FINISHED marker) move into ``stale-<key12>/`` inside it, ``<key12>`` the first 12
characters of their key, after any older ``stale-*`` folder is deleted. One previous run is kept
(to inspect or ``--load``), so the folder holds at most two runs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from opensora_core.config import config_hash as _config_hash

log = logging.getLogger("opensora.checkpoint")

FINISHED = "FINISHED.json"
STALE_PREFIX = "stale-"
CODE_ROOTS = ("opensora_core", "tasks")
"""Top-level folders whose files are code: a dvc.yaml dep inside them enters the code fingerprint."""

RESUME_EXCLUDE: tuple[str, ...] = (
    "profile",
    "tracking",
    "flow",
    "evaluate",
    "register",
    "launch.timeout_s",
    "launch.kill_grace_s",
    "launch.omp_num_threads",
    "launch.rdzv_*",
    "launch.node_rank",
    "launch.max_restarts",
    "launch.store_bind",
    "*.steps",
    "*.progress",
    "*.num_workers",
    "*.*_every",
    "*.keep_last_n",
)
"""Dotted keys (fnmatch patterns) left out of the resume hash: changing them keeps a checkpoint
resumable. Step counts (a longer run resumes a shorter one), logging and checkpoint cadence,
loader workers, launch details that do not change the numbers, and the stages after training.
A job adds the sections it does not depend on (``RESUME_EXCLUDE + ("diffusion",)``)."""


def to_config_dict(config: Any) -> dict[str, Any]:
    """A dataclass or mapping as the plain JSON data ``config.json`` holds (tuples become lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(dict(config), default=str))


def _drop_keys(data: Any, patterns: tuple[str, ...], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if any(fnmatch.fnmatchcase(dotted, p) for p in patterns):
            continue
        out[key] = _drop_keys(value, patterns, dotted)
    return out


def resume_config_hash(config: Any, exclude: tuple[str, ...] = RESUME_EXCLUDE) -> str:
    """``config_hash`` of the resolved config (dataclass or mapping) less the keys matching ``exclude``."""
    return _config_hash(_drop_keys(to_config_dict(config), exclude))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_diff(old: Any, new: Any, exclude: tuple[str, ...] = RESUME_EXCLUDE) -> list[str]:
    """``key: old -> new`` for every dotted key that differs (excluded keys ignored)."""
    a = _flatten(_drop_keys(to_config_dict(old), exclude))
    b = _flatten(_drop_keys(to_config_dict(new), exclude))
    missing = object()
    return [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


# --------------------------------------------------------------------------------------------
# Code fingerprint
# --------------------------------------------------------------------------------------------
def project_root() -> Path:
    """The folder holding ``opensora_core/`` (and ``dvc.yaml`` in a checkout)."""
    return Path(__file__).resolve().parents[2]


def stage_code_deps(dvc_stage: str, root: Path | None = None) -> list[str]:
    """The deps of ``dvc_stage`` in ``root/dvc.yaml`` that are code (see :data:`CODE_ROOTS`);
    all of the code roots when the file or the stage is missing."""
    import yaml

    root = root or project_root()
    try:
        stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
        deps = [str(d) for d in stages[dvc_stage].get("deps", [])]
    except (OSError, KeyError, AttributeError, yaml.YAMLError):
        return list(CODE_ROOTS)
    return [d for d in deps if Path(d).parts and Path(d).parts[0] in CODE_ROOTS]


def code_fingerprint(dvc_stage: str, root: Path | None = None) -> dict[str, str]:
    """``relative path -> sha256`` (16 hex digits) of every file of the stage's code deps."""
    root = root or project_root()
    files: set[Path] = set()
    for dep in stage_code_deps(dvc_stage, root):
        path = root / dep
        if path.is_file():
            files.add(path)
        elif path.is_dir():
            files.update(
                p
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(files)
    }


# --------------------------------------------------------------------------------------------
# Finished runs, stale checkpoints, the resume decision
# --------------------------------------------------------------------------------------------
def mark_finished(ckpt_dir: str | Path, key: str, step: int) -> None:
    """Record that the run of ``key`` reached its end at ``step`` (rank 0, after its outputs)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".{FINISHED}.tmp"
    tmp.write_text(json.dumps({"config_hash": key, "step": step}) + "\n")
    os.replace(tmp, ckpt_dir / FINISHED)


def finished_step(ckpt_dir: str | Path, key: str) -> int | None:
    """The step at which a run of ``key`` finished in ``ckpt_dir``, or None."""
    try:
        data = json.loads((Path(ckpt_dir) / FINISHED).read_text())
    except (OSError, ValueError):
        return None
    return int(data["step"]) if data.get("config_hash") == key else None


def set_aside(ckpt_dir: str | Path) -> Path | None:
    """Move every checkpoint of ``ckpt_dir`` (and FINISHED.json) into ``stale-<key12>/``; older
    ``stale-*`` folders are deleted first. Returns the new folder, or None when there was nothing."""
    from opensora_core.training.checkpoint import checkpoint_step, read_meta

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    old = sorted((p for p in ckpt_dir.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step)
    if (ckpt_dir / FINISHED).is_file():
        old.append(ckpt_dir / FINISHED)
    if not old:
        return None
    for stale in ckpt_dir.glob(f"{STALE_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        key = str(read_meta(next(p for p in reversed(old) if p.is_dir())).get("config_hash", ""))
    except (OSError, ValueError, StopIteration):
        key = ""
    dest = ckpt_dir / f"{STALE_PREFIX}{key[:12] or 'unknown'}"
    dest.mkdir()
    for path in old:
        os.rename(path, dest / path.name)
    return dest


def select_resume(
    ckpt_dir: str | Path, key: str, resolved: Any, exclude: tuple[str, ...], target_step: int
) -> tuple[Path | None, str]:
    """The checkpoint this run resumes (None = fresh) and why; every rank calls it.

    Rank 0 decides (:func:`~opensora_core.training.checkpoint.find_resume_checkpoint`, then the
    FINISHED rule of the module docstring) and tells the others; a fresh start sets the old
    checkpoints aside before any rank goes on.
    """
    # Imported here: checkpoint.py imports this module for the hash.
    from opensora_core.distributed.dist import barrier, broadcast_object, get_rank
    from opensora_core.training.checkpoint import find_resume_checkpoint

    decision = None
    if get_rank() == 0:
        path, reason = find_resume_checkpoint(ckpt_dir, key, resolved, exclude)
        done = finished_step(ckpt_dir, key)
        if path is not None and done is not None and done >= target_step:
            path = None
            reason = (
                f"the run with this config, code and data already finished at step {done} "
                f"(a forced rerun): training again from step 0"
            )
        if path is None:
            moved = set_aside(ckpt_dir)
            reason += f"; earlier checkpoints moved to {moved}" if moved else ""
        decision = (str(path) if path else None, reason)
    path, reason = broadcast_object(decision)
    barrier()
    return (Path(path) if path else None), reason
