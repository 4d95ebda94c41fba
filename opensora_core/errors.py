"""Errors that map to the stage exit codes of the pipeline contract.

Every stage CLI and every distributed job exits with one of these codes, so that the orchestrator
can tell a retryable failure (75) from one that would fail the same way again (2-5, 74).
"""

from __future__ import annotations


class StageError(Exception):
    """Base class: an error a stage reports with a specific exit code and a readable message."""

    exit_code: int = 1


class ConfigError(StageError, ValueError):
    """Bad parameters: an unknown key, a wrong type, a value out of range."""

    exit_code = 2


class InputError(StageError):
    """A missing or unreadable input path or file."""

    exit_code = 2


class GateFailed(StageError):
    """A validation or promotion gate did not pass."""

    exit_code = 3


class OutOfMemory(StageError):
    """The accelerator ran out of memory and the job could not recover."""

    exit_code = 4


class NonFiniteLoss(StageError):
    """The training loss became NaN or infinite."""

    exit_code = 5


class DiskFull(StageError):
    """Writing a checkpoint failed for want of space (or another write error); the previous
    checkpoints are intact. Exit 74 is sysexits' EX_IOERR, beside 75 (EX_TEMPFAIL): a retry
    fails the same way until space is freed, so the orchestrator does not retry it."""

    exit_code = 74


class Retryable(StageError):
    """A failure worth retrying: a rendezvous or collective timeout, a killed worker."""

    exit_code = 75


EXIT_OK = 0
EXIT_BAD_INPUT = ConfigError.exit_code
EXIT_GATE = GateFailed.exit_code
EXIT_OOM = OutOfMemory.exit_code
EXIT_NONFINITE = NonFiniteLoss.exit_code
EXIT_RETRYABLE = Retryable.exit_code
EXIT_DISK_FULL = DiskFull.exit_code

# Exit codes the orchestrator may retry; everything in 2..5 fails the same way twice.
RETRYABLE_EXIT_CODES = frozenset({EXIT_RETRYABLE, -9, 137, 143, -15})


class JobFailed(StageError):
    """A distributed job ended with a non-zero exit code; the stage exits with the same code."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
