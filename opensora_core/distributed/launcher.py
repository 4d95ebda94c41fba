"""Launch a distributed job with torchrun and turn its outcome into a pipeline exit code.

A job is a module under ``opensora_core.jobs`` run by ``torchrun`` (``python -m
torch.distributed.run``), one process per GPU (or one on CPU)::

    code = run_job("opensora_core.jobs.vae_train", ["--params", "params.yaml"], cfg.launch)

torchrun exits with 1 whatever went wrong in a worker, so the workers report their own outcome:
:func:`opensora_core.jobs.common.job_main` writes ``rank-NNNNN.json`` (exit code, message, time)
into the folder named by the environment variable ``OPENSORA_JOB_STATUS_DIR``, which
:func:`run_job` creates for each launch. The launcher returns the exit code of the first rank that
failed (by time), so a NaN loss on rank 1 is reported as 5 even when rank 0 then died of the
broken collective. A worker that left no status file and was killed by a signal maps to 75
(retryable).

torchrun starts every worker in a session of its own, so killing torchrun's process group is not
enough: on a timeout, a cancel, Ctrl-C or SIGTERM of this process, :func:`kill_process_tree`
signals every process group in the tree (SIGTERM, then SIGKILL after a grace period).

This module imports neither torch nor colossalai.
"""

from __future__ import annotations

import atexit
import codecs
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from opensora_core.config import LaunchConfig
from opensora_core.errors import EXIT_OK, EXIT_RETRYABLE, ConfigError
from opensora_core.process import kill_process_tree

STATUS_DIR_ENV = "OPENSORA_JOB_STATUS_DIR"
"""Environment variable naming the folder where each worker writes its status file."""

_STDERR_TAIL_CHUNKS = 400
_live_jobs: set[subprocess.Popen] = set()
_live_jobs_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_torchrun_command(launch: LaunchConfig, module: str, args: list[str]) -> list[str]:
    """The torchrun command line that runs ``python -m module args...`` on every worker.

    Single node without an endpoint: a c10d rendezvous on ``launch.store_bind`` (127.0.0.1) at a
    free port, what ``--standalone`` does but listening on that address only (torchrun is run
    through :mod:`opensora_core.distributed.bound_store`, since torch's store listens on every
    interface whatever host it is given). With ``launch.rdzv_endpoint``: a c10d multi-node
    rendezvous of :func:`rendezvous_args`; a loopback endpoint's store listens on that address
    only. ``launch.max_restarts`` lets torchrun restart the worker group after a failure; every c10d
    launch runs through the same wrapper, which gives each rendezvous round's workers a fresh store
    (torch's shared one keeps the dead round's keys).
    """
    common = [
        "--nnodes",
        str(launch.nnodes),
        "--nproc-per-node",
        str(launch.nproc_per_node),
        "--max-restarts",
        str(launch.max_restarts),
    ]
    bind = ""
    if not launch.rdzv_endpoint:
        if launch.nnodes > 1:
            raise ConfigError("launch.rdzv_endpoint is required when launch.nnodes > 1")
        if launch.store_bind:
            bind = launch.store_bind
            endpoint = f"[{bind}]:0" if ":" in bind else f"{bind}:0"
            common += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", launch.rdzv_id]
            common += ["--local-addr", bind]
        else:
            common.append("--standalone")
    else:
        host, _ = _split_endpoint(launch.rdzv_endpoint)
        bind = host.strip("[]") if host.strip("[]") in LOOPBACK_HOSTS else ""
        common += rendezvous_args(launch)
        if bind:
            common += ["--local-addr", bind]
    runner = [sys.executable, "-m", "torch.distributed.run"]
    if bind or (launch.rdzv_endpoint and launch.rdzv_backend == "c10d"):
        # The agent wrapper: bound stores, and a fresh worker store for every rendezvous round.
        wrapper = ["opensora_core.distributed.bound_store", *(["--bind", bind] if bind else [])]
        runner = [sys.executable, "-m", *wrapper, *runner[2:]]
    return [*runner, *common, "-m", module, *args]


def rendezvous_args(launch: LaunchConfig) -> list[str]:
    """torchrun's rendezvous options for a launch with an endpoint.

    ``c10d`` (elastic): every node joins ``rdzv_endpoint`` under ``rdzv_id`` within
    ``rdzv_timeout_s``; node 0 hosts the store (``is_host``), so two nodes on one machine (or an
    endpoint that is not this host's name) need no guessing. ``static``: fixed node ranks with
    rank 0's address as master.
    """
    host, port = _split_endpoint(launch.rdzv_endpoint)
    if launch.rdzv_backend == "static":
        return ["--node-rank", str(launch.node_rank), "--master-addr", host, "--master-port", port]
    conf = f"join_timeout={launch.rdzv_timeout_s}"
    if launch.node_rank >= 0:
        conf += f",is_host={int(launch.node_rank == 0)}"
    return [
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        launch.rdzv_endpoint,
        "--rdzv-id",
        launch.rdzv_id,
        "--rdzv-conf",
        conf,
    ]


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"launch.rdzv_endpoint must be host:port, got {endpoint!r}")
    return host, port


def build_job_env(
    launch: LaunchConfig, status_dir: str | Path, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The workers' environment: ours, then ``env``, with the interpreter's bin folder first on PATH."""
    out = dict(os.environ)
    out.update(env or {})
    bin_dir = os.path.dirname(sys.executable)
    path = [p for p in out.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    out["PATH"] = os.pathsep.join([bin_dir, *path])
    out["PYTHONUNBUFFERED"] = "1"
    out[STATUS_DIR_ENV] = str(status_dir)
    if launch.omp_num_threads > 0:
        out["OMP_NUM_THREADS"] = str(launch.omp_num_threads)
    return out


# --------------------------------------------------------------------------------------------
# Worker status files
# --------------------------------------------------------------------------------------------
@dataclass
class JobStatus:
    """What one worker reports about its own end (``rank-NNNNN.json`` in the status folder)."""

    rank: int
    exit_code: int
    message: str = ""
    error: str = ""
    """Exception class name, empty on success."""
    time: float = 0.0
    """``time.time()`` when the worker finished; orders failures across ranks."""
    host: str = ""
    pid: int = 0
    restart: int = 0
    """torchrun's restart round (``TORCHELASTIC_RESTART_COUNT``) the worker ran in."""


def write_job_status(
    exit_code: int, message: str = "", error: str = "", rank: int | None = None
) -> Path | None:
    """Write this worker's status file (atomically); does nothing outside a launched job."""
    status_dir = os.environ.get(STATUS_DIR_ENV)
    if not status_dir:
        return None
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    status = JobStatus(
        rank, exit_code, message[:4000], error, time.time(), socket.gethostname(), os.getpid(), restart
    )
    path = Path(status_dir) / f"rank-{rank:05d}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(status)))
    os.replace(tmp, path)
    return path


def read_job_statuses(status_dir: str | Path) -> list[JobStatus]:
    """Every readable status file in ``status_dir``, in rank order."""
    out = []
    for path in sorted(Path(status_dir).glob("rank-*.json")):
        try:
            out.append(JobStatus(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return out


_ROOT_CAUSE_RE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


def parse_root_cause(torchrun_stderr: str) -> tuple[int, int] | None:
    """``(rank, exitcode)`` of the "Root Cause" entry in torchrun's failure report, if any."""
    match = _ROOT_CAUSE_RE.search(torchrun_stderr)
    return (int(match.group(1)), int(match.group(2))) if match else None


def resolve_exit_code(
    torchrun_rc: int, statuses: list[JobStatus], torchrun_stderr: str = ""
) -> tuple[int, str]:
    """The job's exit code and a one-line reason, from torchrun's code and the workers' reports.

    1. torchrun succeeded: 0.
    2. A worker wrote a failing status: the earliest one (the cause, not the ranks that died of it).
    3. torchrun's report names a worker killed by a signal: 75; one that exited with a code before
       it could write a status (an import error, say): that code.
    4. Nothing from the workers (rendezvous failure, torchrun killed): 75.
    """
    if torchrun_rc == 0:
        return EXIT_OK, "ok"
    # After elastic restarts only the last round tells why the job ended.
    last_round = max((s.restart for s in statuses), default=0)
    failed = sorted(
        (s for s in statuses if s.exit_code != 0 and s.restart == last_round), key=lambda s: (s.time, s.rank)
    )
    if failed:
        first = failed[0]
        what = f"{first.error}: {first.message}" if first.error else first.message
        return (
            first.exit_code,
            f"rank {first.rank} failed with exit code {first.exit_code} ({_one_line(what)})",
        )
    root = parse_root_cause(torchrun_stderr)
    if root is not None:
        rank, code = root
        if code < 0:
            return EXIT_RETRYABLE, f"rank {rank} was killed by signal {-code} (retryable)"
        if code > 0:
            return code, f"rank {rank} exited with code {code} without reporting a status"
    return (
        EXIT_RETRYABLE,
        f"torchrun exited with code {torchrun_rc} and no worker reported a status (retryable)",
    )


_RDZV_ERROR_RE = re.compile(r"\b(Rendezvous(?:Timeout|Connection|Closed)Error)\b")


def rendezvous_failure(launch: LaunchConfig, torchrun_stderr: str) -> str | None:
    """A readable reason when torchrun's agent failed in the rendezvous itself (no worker ran)."""
    match = _RDZV_ERROR_RE.search(torchrun_stderr)
    if match is None or not launch.rdzv_endpoint:
        return None
    what = {
        "RendezvousTimeoutError": f"not all {launch.nnodes} nodes joined within {launch.rdzv_timeout_s}s",
        "RendezvousConnectionError": "could not reach the rendezvous store",
        "RendezvousClosedError": "the rendezvous was closed by another node",
    }[match.group(1)]
    return (
        f"rendezvous {launch.rdzv_id!r} at {launch.rdzv_endpoint} failed: {what} "
        f"({match.group(1)}; retryable)"
    )


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.strip().splitlines()[:1]) if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
class _Terminated(BaseException):
    """Raised in the launcher's main thread when it receives SIGTERM."""


def run_job(
    module: str,
    args: list[str],
    launch: LaunchConfig,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    *,
    cwd: str | Path | None = None,
    grace_s: float | None = None,
) -> int:
    """Run ``module`` under torchrun and return the job's exit code (0, 2, 3, 4, 5, 75 or 1).

    Workers' stdout and stderr stream through to ours as they are flushed. ``timeout_s`` (default
    ``launch.timeout_s``; 0 or None = no limit) kills the whole process tree and returns 75.
    ``env`` adds to this process's environment. Ctrl-C and SIGTERM of this process kill the tree
    too, then propagate. Worker failures never raise.
    """
    timeout_s = launch.timeout_s if timeout_s is None else timeout_s
    grace_s = launch.kill_grace_s if grace_s is None else grace_s
    cmd = build_torchrun_command(launch, module, args)
    with tempfile.TemporaryDirectory(prefix="opensora-job-") as status_dir:
        job_env = build_job_env(launch, status_dir, env)
        print(f"launch: {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.Popen(
            cmd,
            env=job_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        with _live_jobs_lock:
            _live_jobs.add(proc)
        stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_CHUNKS)
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, None), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, stderr_tail), daemon=True),
        ]
        for t in pumps:
            t.start()
        try:
            rc = _wait(proc, timeout_s, grace_s)
        finally:
            with _live_jobs_lock:
                _live_jobs.discard(proc)
            for t in pumps:
                t.join(timeout=10)
        if rc is None:
            code, reason = EXIT_RETRYABLE, f"timed out after {timeout_s:g}s; killed the whole job (retryable)"
        else:
            stderr_text = "".join(stderr_tail)
            code, reason = resolve_exit_code(rc, read_job_statuses(status_dir), stderr_text)
            rdzv = rendezvous_failure(launch, stderr_text) if code == EXIT_RETRYABLE else None
            reason = rdzv or reason
    if code != EXIT_OK:
        print(f"launch: {module} failed: {reason}", file=sys.stderr, flush=True)
    return code


def _wait(proc: subprocess.Popen, timeout_s: float | None, grace_s: float) -> int | None:
    """Wait for torchrun; on timeout (returns None), Ctrl-C or SIGTERM kill its whole tree."""
    # Signal handlers can only be installed from the main thread; elsewhere (a Prefect task
    # thread) the atexit hook below is what kills a job left running.
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main else None
    on_main = on_main and previous is not signal.SIG_IGN
    if on_main:
        signal.signal(signal.SIGTERM, _raise_terminated)
    terminated = False
    try:
        return proc.wait(timeout=timeout_s or None)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc, grace_s)
        return None
    except KeyboardInterrupt:
        kill_process_tree(proc, grace_s)
        raise
    except _Terminated:
        kill_process_tree(proc, grace_s)
        terminated = True
        raise
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if terminated:
            signal.raise_signal(signal.SIGTERM)  # now the previous handler (or the default) acts


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def _pump(src: IO[bytes], dst: IO[str], tail: collections.deque[str] | None) -> None:
    """Copy a worker pipe to ``dst`` as output arrives (keeping the last chunks in ``tail``).

    Whatever the workers flushed is written and flushed at once: whole lines, and also the
    carriage-return updates of progress bars, which a line reader would hold back until the end.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = src.fileno()
    while True:
        raw = os.read(fd, 65536)
        text = decoder.decode(raw, final=not raw)
        if text:
            if tail is not None:
                tail.append(text)
            try:
                dst.write(text)
                dst.flush()
            except (OSError, ValueError):  # our own stream was closed; keep draining the pipe
                pass
        if not raw:
            break
    src.close()


@atexit.register
def _kill_live_jobs() -> None:
    """Kill jobs still running when the interpreter exits (a cancelled flow run, say)."""
    with _live_jobs_lock:
        jobs = list(_live_jobs)
    for proc in jobs:
        if proc.poll() is None:
            kill_process_tree(proc, grace_s=2.0)
