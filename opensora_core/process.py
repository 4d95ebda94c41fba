"""Run a command in its own process group, stream its output, kill the whole group on timeout.

One copy of this logic serves the torchrun launcher and the Prefect flow's ``dvc repro`` calls:
a stage that times out or is cancelled must leave no orphan behind (an orphan would keep DVC's
lock or a GPU busy).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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


def kill_group(proc: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL whatever is left after ``grace``."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        kill_group(proc, grace_s)
    except BaseException:
        kill_group(proc, grace_s)
        raise
    finally:
        reader.join(timeout=5)
    # The leader may exit while children it started still run: never leave them behind.
    if _group_alive(proc.pid):
        kill_group(proc, grace_s)
    code = TIMEOUT_EXIT_CODE if timed_out else proc.returncode
    return ProcessResult(returncode=code, seconds=time.monotonic() - start, timed_out=timed_out)
