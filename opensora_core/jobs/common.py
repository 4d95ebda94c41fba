"""The wrapper every job entry point runs under: exceptions -> exit codes -> the launcher.

A job module ends with::

    @job_entrypoint
    def main() -> None:
        args = parse_args()   # the job parses its own arguments
        ...

    if __name__ == "__main__":
        main()

The wrapper calls the function, maps :mod:`opensora_core.errors` exceptions, CUDA out-of-memory
and torch.distributed failures to the pipeline's exit codes, writes this rank's status file for
:func:`opensora_core.distributed.launcher.run_job`, prints one clear line (and the traceback of an
unexpected error), destroys the process group and exits with the code.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from opensora_core.distributed.launcher import write_job_status
from opensora_core.errors import (
    EXIT_OK,
    EXIT_OOM,
    EXIT_RETRYABLE,
    StageError,
)

EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130

# Substrings of collective / rendezvous failures raised as plain RuntimeErrors (gloo, NCCL, c10d):
# a peer died or the network stalled, which a retry may fix.
_RETRYABLE_MESSAGES = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "nccl communicator was aborted",
    "nccl error",
    "socket closed",
)


def exit_code_for(exc: BaseException) -> int:
    """The exit code of the pipeline contract for an exception raised by a job."""
    if isinstance(exc, StageError):
        return exc.exit_code
    if isinstance(exc, SystemExit):
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_UNEXPECTED)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, MemoryError):
        return EXIT_OOM
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(exc, torch.OutOfMemoryError):
            return EXIT_OOM
        tdist = getattr(torch, "distributed", None)
        dist_errors = tuple(
            getattr(tdist, name)
            for name in ("DistBackendError", "DistNetworkError", "DistStoreError")
            if tdist and hasattr(tdist, name)
        )
        if dist_errors and isinstance(exc, dist_errors):
            return EXIT_RETRYABLE
    if isinstance(exc, RuntimeError | ConnectionError | TimeoutError):
        text = str(exc).lower()
        if isinstance(exc, ConnectionError | TimeoutError) or any(m in text for m in _RETRYABLE_MESSAGES):
            return EXIT_RETRYABLE
    return EXIT_UNEXPECTED


def run_job_fn(fn: Callable[[], Any], name: str | None = None) -> int:
    """Call ``fn()`` and return its exit code, after writing the status and destroying the group."""
    name = name or _job_name(fn)
    rank = os.environ.get("RANK", "0")
    code, message, error = EXIT_OK, "ok", ""
    try:
        fn()
    except BaseException as exc:  # every outcome, even Ctrl-C, must reach the launcher
        code = exit_code_for(exc)
        if code != EXIT_OK:
            error = type(exc).__name__
            message = str(exc).strip() or error
            if code == EXIT_UNEXPECTED:
                traceback.print_exc()
            first_line = message.splitlines()[0]
            print(
                f"{name} [rank {rank}]: error (exit {code}): {error}: {first_line}",
                file=sys.stderr,
                flush=True,
            )
    try:
        write_job_status(code, message, error)
    except OSError as exc:
        print(f"{name} [rank {rank}]: could not write the job status: {exc}", file=sys.stderr, flush=True)
    _maybe_destroy_process_group()
    return code


def job_main(fn: Callable[[], Any], name: str | None = None) -> NoReturn:
    """Run ``fn`` under :func:`run_job_fn` and exit the process with its code."""
    sys.stdout.flush()
    sys.exit(run_job_fn(fn, name))


def job_entrypoint(fn: Callable[[], Any]) -> Callable[[], NoReturn]:
    """Decorator form of :func:`job_main`: calling the decorated function runs the job and exits."""

    @functools.wraps(fn)
    def wrapper() -> NoReturn:
        job_main(fn)

    return wrapper


def _job_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", "") or ""
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else os.path.basename(sys.argv[0])
    return module.rsplit(".", 1)[-1] or "job"


def _maybe_destroy_process_group() -> None:
    tdist = sys.modules.get("torch.distributed")
    if tdist is None:
        return
    try:
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception as exc:  # a broken group after a peer died: nothing left to clean
        print(f"could not destroy the process group: {exc}", file=sys.stderr, flush=True)
