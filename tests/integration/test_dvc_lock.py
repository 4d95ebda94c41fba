"""Two runs of the same stage at once, with real DVC on a scratch repository.

The first run's command blocks until the test lets it go, so the second run starts while the
first holds DVC's read/write lock on the stage's outs. Plain ``dvc repro``: the second fails at
once naming the lock, the first completes, ``dvc.lock`` is intact. Through the flow's task: the
lock error is classified retryable, Prefect retries, and the retry finds the stage up to date.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.dvc_dag import DVC_LOCK_HELD, command_exit_code, is_retryable

pytestmark = pytest.mark.slow

# The stage writes started.txt, waits for go.txt, then writes its out.
STAGE_CMD = (
    f"{sys.executable} -c \"import pathlib, time; pathlib.Path('started.txt').write_text('1'); "
    "[time.sleep(0.1) for _ in iter(lambda: pathlib.Path('go.txt').exists(), True)]; "
    "pathlib.Path('out.txt').write_text('done')\""
)


def dvc(root: Path, *args: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dvc", *args]
    env = {"DVC_NO_ANALYTICS": "1", "PATH": str(Path(sys.executable).parent), "HOME": str(root)}
    if kwargs.pop("background", False):
        return subprocess.Popen(
            cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q", check=True)
    stage = {"cmd": STAGE_CMD, "deps": ["in.txt"], "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": stage}}))
    (tmp_path / "in.txt").write_text("input")
    return tmp_path


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the first run exited early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


def assert_lock_intact(root: Path) -> None:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = lock["stages"]["slow"]["outs"]
    assert outs[0]["path"] == "out.txt"
    assert outs[0]["md5"] == hashlib.md5((root / "out.txt").read_bytes()).hexdigest()
    status = dvc(root, "status", "slow")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr


def test_second_dvc_repro_fails_fast_naming_the_lock(repo: Path) -> None:
    first = dvc(repo, "repro", "--single-item", "slow", background=True)
    try:
        wait_for(repo / "started.txt", first)
        start = time.monotonic()
        second = dvc(repo, "repro", "--single-item", "slow")
        took = time.monotonic() - start
    finally:
        (repo / "go.txt").write_text("go")
    output = second.stdout + second.stderr
    assert second.returncode != 0 and took < 30, output
    assert "is busy, it is being blocked by" in output and f"(PID {first.pid})" in output, output
    assert ".dvc/tmp/rwlock" in output
    assert DVC_LOCK_HELD.search(output)
    assert is_retryable(command_exit_code(output, second.returncode), output)
    assert first.wait(timeout=120) == 0, first.stdout.read()
    assert (repo / "out.txt").read_text() == "done"
    assert_lock_intact(repo)


class _Lines(logging.Handler):
    """Collects the flow task's log lines; lets the first run go once the lock error was logged."""

    def __init__(self, go: Path) -> None:
        super().__init__()
        self.go = go
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        if "is busy, it is being blocked by" in line:
            self.go.write_text("go")


def test_flow_retries_the_lock_error_until_the_first_run_is_done(repo: Path, monkeypatch) -> None:
    from prefect import flow

    from flows.pipeline import run_stage

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(repo / ".prefect"))
    first = dvc(repo, "repro", "--single-item", "slow", background=True)
    lines = _Lines(repo / "go.txt")
    logger = logging.getLogger("prefect")
    logger.addHandler(lines)
    states: list = []

    @flow
    def second_run() -> object:
        runner = run_stage.with_options(retries=20, retry_delay_seconds=1)
        state = runner("slow", str(repo), False, 120, None, return_state=True)
        states.append(state)
        return state.result()

    try:
        wait_for(repo / "started.txt", first)
        thread = threading.Thread(target=second_run)
        thread.start()
        thread.join(timeout=300)
    finally:
        logger.removeHandler(lines)
        (repo / "go.txt").write_text("go")
    assert first.wait(timeout=120) == 0, first.stdout.read()
    assert any("is busy, it is being blocked by" in line for line in lines.lines), lines.lines[-20:]
    assert states and states[0].is_completed(), states
    outcome = states[0].result()
    assert outcome.stage == "slow" and outcome.status == "skipped"  # the first run made it up to date
    assert_lock_intact(repo)
