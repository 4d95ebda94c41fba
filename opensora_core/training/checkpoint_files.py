"""A checkpoint's file manifest, its verification, write failures and the test hook of a save.

``files.json`` lists every file of a checkpoint folder (relative path, size in bytes, sha256)
except itself and ``COMPLETE``; :func:`opensora_core.training.checkpoint.save_checkpoint` writes
it after the files are synced and before ``COMPLETE``. :func:`verify_checkpoint` compares a folder
with it: a truncated, missing or corrupt file is a problem, and the resume selection skips that
checkpoint for the previous complete one. Checkpoints saved before the manifest existed carry
none and are taken as they are.

A failed write of a checkpoint (no space left, a quota, a short write that ``torch.save`` reports
as a ``RuntimeError``) becomes :class:`~opensora_core.errors.DiskFull` (exit 74) naming the
folder and the free space.

Test hook: with ``OPENSORA_CKPT_HOLD_AT_STEP=N`` in the environment, rank 0 stops inside the save
of step ``N`` once every file is written and synced but before ``COMPLETE`` (the moment a kill
must not leave a resumable half checkpoint): it creates ``HOLD`` in the temp folder, then waits
for a signal. The fault-matrix tests kill it there; nothing else sets the variable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from opensora_core.data.shards import file_sha256
from opensora_core.errors import DiskFull

FILES = "files.json"
HOLD_ENV = "OPENSORA_CKPT_HOLD_AT_STEP"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
_WRITE_FAILED = ("unexpected pos", "write failed", "no space left", "file too large", "quota")


def write_file_manifest(folder: Path, skip: tuple[str, ...] = ("COMPLETE",)) -> dict[str, Any]:
    """Write ``folder/files.json`` (size and sha256 of every other file), synced; returns it."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == FILES or rel in skip:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"files": files}
    with open(folder / FILES, "w") as fh:
        fh.write(json.dumps(manifest, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def verify_checkpoint(folder: str | Path) -> list[str]:
    """What is wrong with ``folder`` against its ``files.json`` (empty when it matches or has none).

    Sizes are compared first (a truncated file costs no hashing), then contents.
    """
    folder = Path(folder)
    manifest_path = folder / FILES
    if not manifest_path.is_file():
        return []
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, OSError) as exc:
        return [f"{manifest_path.name} unreadable ({exc})"]
    problems = []
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, {want['size']} were written")
    if problems:
        return problems
    return [
        f"{rel} sha256 differs" for rel, want in files.items() if file_sha256(folder / rel) != want["sha256"]
    ]


def is_write_failure(exc: BaseException) -> bool:
    """True for an error of writing a file: no space, a quota, a file size limit, a short write."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(m in text for m in _WRITE_FAILED)
    return False


def disk_full_error(exc: BaseException, ckpt_dir: Path, step: int, previous: str) -> DiskFull:
    """The :class:`DiskFull` error of a failed save (its temp folder already removed)."""
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
    return DiskFull(
        f"could not write the step-{step} checkpoint in {ckpt_dir} ({type(exc).__name__}: "
        f"{' '.join(str(exc).split())[:200]}; {free} after removing the partial folder); {kept}. "
        "Free space (or point the stage at a larger disk) and rerun: it resumes from there"
    )


def maybe_hold(tmp: Path, step: int) -> None:
    """The test hook (module docstring): stop before ``COMPLETE`` of step ``N`` until killed."""
    if os.environ.get(HOLD_ENV, "") != str(step):
        return
    (tmp / "HOLD").touch()
    while True:
        signal.pause()
