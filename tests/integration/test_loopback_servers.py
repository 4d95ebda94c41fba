"""Every server the project starts listens on 127.0.0.1 unless told otherwise.

Real servers, real sockets: the Prefect server a flow run starts for itself (no PREFECT_API_URL),
and the ``make ui-prefect`` / ``make ui-mlflow`` commands as the Makefile writes them. A socket
counts when it is in LISTEN state in the server's process tree (psutil reads /proc/net/tcp*).
torchrun's store is tested with a real job in tests/unit/distributed/test_launcher.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import ROOT, free_port, stop, wait_until

pytestmark = pytest.mark.slow
LOOPBACK = ("127.0.0.1", "::1")


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the LISTEN sockets of ``pid`` and its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    out = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        out += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def make_recipe(target: str) -> list[str]:
    """The command line of a one-line Makefile recipe, with ``$(BIN)`` as this interpreter's bin."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"(?m)^{re.escape(target)}:.*\n\t(.+)$", text)
    assert match, f"no recipe for {target} in the Makefile"
    return match.group(1).replace("$(BIN)", str(Path(sys.executable).parent)).split()


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_UI_ENABLED": "false"}


@pytest.mark.parametrize("target", ["ui-mlflow", "ui-prefect"])
def test_make_ui_targets_listen_on_loopback_only(tmp_path: Path, target: str) -> None:
    port = free_port()
    cmd = [*make_recipe(target), "--port", str(port)]
    assert "0.0.0.0" not in cmd
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=clean_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: any(p == port for _, p in listening(proc.pid)), 180, f"{target} on {port}", proc)
        sockets = listening(proc.pid)
        assert [s for s in sockets if s[0] not in LOOPBACK] == [], sockets
    finally:
        stop(proc)


FLOW = """
import json, os
import opensora_core  # the package's environment defaults, as flows/pipeline.py imports it
import psutil
from prefect import flow

@flow
def probe():
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        found += [(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN]
    return found

print(json.dumps({"api": os.environ.get("PREFECT_API_URL", ""), "listening": probe()}))
"""


def test_flow_run_without_a_server_starts_one_on_loopback(tmp_path: Path) -> None:
    # No PREFECT_API_URL: Prefect starts a temporary server in a child process for the run.
    out = subprocess.run(
        [sys.executable, "-c", FLOW],
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    sockets = [tuple(s) for s in report["listening"]]
    assert sockets, f"the temporary Prefect server should be listening: {out.stderr[-2000:]}"
    assert [s for s in sockets if s[0] not in LOOPBACK] == [], sockets


def test_no_source_binds_every_interface_by_default() -> None:
    wildcard = re.compile(r"0\.0\.0\.0|--host[ =]+(?:0|::)\b|bind\(\(\s*['\"]['\"]")
    hits = []
    for path in [ROOT / "Makefile", *ROOT.glob("flows/*.py"), *ROOT.glob("tasks/*.py")]:
        hits += [f"{path.name}: {m.group(0)}" for m in wildcard.finditer(path.read_text())]
    for path in (ROOT / "opensora_core").rglob("*.py"):
        hits += [f"{path.name}: {m.group(0)}" for m in wildcard.finditer(path.read_text())]
    assert hits == []
