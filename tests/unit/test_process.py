"""run_process_group: streamed output, exit codes, and a timeout that leaves no process behind."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import psutil

from opensora_core.process import TIMEOUT_EXIT_CODE, run_process_group


def test_streams_lines_in_order_and_returns_the_exit_code() -> None:
    lines: list[str] = []
    code = "import sys; print('one'); print('two', file=sys.stderr, flush=True); sys.exit(3)"
    result = run_process_group([sys.executable, "-c", code], on_line=lines.append)
    assert result.returncode == 3
    assert lines == ["one", "two"]
    assert not result.timed_out


def test_timeout_kills_children_in_other_sessions(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    # The child starts a grandchild in a session of its own, as torchrun does with its workers.
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                 start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(300)
        """
    )
    result = run_process_group([sys.executable, "-c", script], timeout_s=3, on_line=lambda _: None, grace_s=1)
    assert result.timed_out and result.returncode == TIMEOUT_EXIT_CODE
    grandchild = int(pid_file.read_text())
    try:
        alive = psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    assert not alive
