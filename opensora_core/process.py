"""Run a command in its own process group, stream its output, kill the whole tree on timeout.

One copy of this logic serves the torchrun launcher and the Prefect flow's ``dvc repro`` calls:
a stage that times out or is cancelled must leave no orphan behind (an orphan would keep DVC's
lock or a GPU busy). torchrun starts each worker in a session of its own, so killing one process
group is not enough: :func:`kill_process_tree` signals every group in the tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

TIMEOUT_EXIT_CODE = 124
GRACE_SECONDS = 10.0


@dataclass
class ProcessResult:
    returncode: int
    seconds: float
    timed_out: bool = False


def venv_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default os.environ) with the running interpreter's bin folder first on PATH."""
    out = dict(os.environ if env is None else env)
    bin_dir = str(Path(sys.executable).parent)
    path = out.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        out["PATH"] = bin_dir + os.pathsep + path
    return out


def kill_process_tree(proc: subprocess.Popen | int, grace_s: float = 10.0) -> None:
    """SIGTERM every process group under ``proc`` (itself included), SIGKILL what is left after ``grace_s``.

    torchrun puts each worker in a session of its own, so the groups are collected from the whole
    tree first; a group kill also reaches processes a worker started (data loader workers).
    """
    pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    own_group = os.getpgrp()
    groups = set()
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            continue
    groups.discard(own_group)
    _signal_tree(groups, procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        if isinstance(proc, subprocess.Popen):
            proc.poll()  # reap torchrun as soon as it exits
        time.sleep(0.05)
    # Anything the survivors started meanwhile (possibly in new sessions) goes down with them.
    survivors = [p for p in procs if _alive(p)]
    for p in list(survivors):
        with contextlib.suppress(psutil.Error):
            survivors += p.children(recursive=True)
    for p in survivors:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            groups.add(os.getpgid(p.pid))
    groups.discard(own_group)
    _signal_tree(groups, survivors, signal.SIGKILL)
    if isinstance(proc, subprocess.Popen):
        proc.wait()


def _signal_tree(groups: set[int], procs: list[psutil.Process], sig: signal.Signals) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (an orphaned worker may stay a zombie until PID 1 reaps it)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_process_group(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] | None = None,
    grace_s: float = GRACE_SECONDS,
) -> ProcessResult:
    """Run ``cmd`` in a new session; each output line goes to ``on_line`` (default: stdout).

    stderr is merged into stdout so lines keep their order. On timeout the whole group gets
    SIGTERM, then SIGKILL, and the result has ``returncode`` 124. A KeyboardInterrupt or
    SystemExit in the caller also kills the group before propagating.
    """
    emit = on_line or (lambda line: print(line, flush=True))
    start = time.monotonic()
    proc = subprocess.Popen(
        list(cmd),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
        errors="replace",
        bufsize=1,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            emit(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s if timeout_s and timeout_s > 0 else None)
    except subprocess.TimeoutExpired:
        timed_out = True
        emit(f"timeout after {timeout_s:.0f}s: killing process group {proc.pid}")
        kill_process_tree(proc, grace_s)
    except BaseException:
        kill_process_tree(proc, grace_s)
        raise
    finally:
        reader.join(timeout=5)
    code = TIMEOUT_EXIT_CODE if timed_out else proc.returncode
    return ProcessResult(returncode=code, seconds=time.monotonic() - start, timed_out=timed_out)
