"""The DVC DAG as the flow sees it: stage order from dvc.yaml, and DVC's verdict on each run.

The flow never keeps a second hand-written list of stages: it reads ``dvc.yaml`` and orders the
stages by their data dependencies (a stage depends on another when one of its deps is, or lies
inside, one of the other's outs), keeping the file's order among independent stages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from opensora_core.errors import RETRYABLE_EXIT_CODES

DVC_FAILED_CMD = re.compile(r"failed to run: .*?, exited with (-?\d+)")
# DVC's two lock errors: the repository lock (``.dvc/tmp/lock``: "Unable to acquire lock") and the
# read/write lock on a stage's deps and outs (``.dvc/tmp/rwlock``: "'out.txt' is busy, it is being
# blocked by: (PID 123): dvc repro ..."), which is what a second run of the same stage hits.
DVC_LOCK_HELD = re.compile(
    r"Unable to acquire lock|is locked by|LockError|is busy, it is being blocked by", re.IGNORECASE
)
DVC_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
DVC_RAN = re.compile(r"Running stage '([^']+)'")


def _paths(entries: list[Any] | None) -> list[str]:
    out = []
    for entry in entries or []:
        out.append(entry if isinstance(entry, str) else next(iter(entry)))
    return [p.rstrip("/") for p in out]


def read_stages(root: Path) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    stages = data.get("stages") or {}
    if any("foreach" in s or "matrix" in s for s in stages.values()):
        raise ValueError("dvc.yaml: foreach/matrix stages are not supported by the flow")
    return stages


def stage_order(root: Path) -> list[str]:
    """Stage names of dvc.yaml in dependency order (a topological sort, stable in file order)."""
    stages = read_stages(root)
    outs = {
        name: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots"))
        for name, s in stages.items()
    }
    upstream: dict[str, set[str]] = {name: set() for name in stages}
    for name, stage in stages.items():
        for dep in _paths(stage.get("deps")):
            for other, paths in outs.items():
                if other != name and any(dep == p or dep.startswith(p + "/") for p in paths):
                    upstream[name].add(other)
    order: list[str] = []
    remaining = list(stages)
    while remaining:
        ready = [n for n in remaining if upstream[n] <= set(order)]
        if not ready:
            raise ValueError(f"dvc.yaml has a dependency cycle among {remaining}")
        order.append(ready[0])
        remaining.remove(ready[0])
    return order


def upstream_of(root: Path, target: str) -> list[str]:
    """The stages ``target`` needs, itself included, in order."""
    order = stage_order(root)
    if target not in order:
        raise ValueError(f"unknown stage {target!r}; stages in dvc.yaml: {', '.join(order)}")
    stages = read_stages(root)
    outs = {n: _paths(s.get("outs")) + _paths(s.get("metrics")) for n, s in stages.items()}
    needed = {target}
    for name in reversed(order):
        if name not in needed:
            continue
        for dep in _paths(stages[name].get("deps")):
            for other, paths in outs.items():
                if any(dep == p or dep.startswith(p + "/") for p in paths):
                    needed.add(other)
    return [n for n in order if n in needed]


def command_exit_code(output: str, dvc_returncode: int) -> int:
    """The stage command's own exit code: DVC exits 255 and names it in an error line."""
    match = DVC_FAILED_CMD.search(output)
    if match:
        return int(match.group(1))
    return dvc_returncode


def is_retryable(code: int, output: str) -> bool:
    """A killed process, a rendezvous/collective timeout (75), or DVC's lock held elsewhere."""
    return code in RETRYABLE_EXIT_CODES or bool(DVC_LOCK_HELD.search(output))
