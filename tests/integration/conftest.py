"""A temporary copy of the repository on the ``params/ci.yaml`` micro profile.

The copy has its own git, DVC cache, MLflow store and PREFECT_HOME, so integration tests never
touch the working tree. One pipeline run is shared by the whole session: a real Prefect server on
a free loopback port, the deployment served by ``python -m flows.serve``, and a run triggered
through the Prefect client (``pipeline_run``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "ci.yaml"


@dataclass
class Project:
    """A scratch copy of the repository and the environment to run commands in it."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 1800, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(cmd),
            cwd=self.root,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                f"\n--- stderr ---\n{proc.stderr[-6000:]}"
            )
        return proc

    def python(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(sys.executable, *args, **kwargs)

    def dvc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, **kwargs)


def pipeline_outputs(root: Path, only: list[str] | None = None) -> list[str]:
    """Every path dvc.yaml's stages (or the stages named in ``only``) write (outs, metrics, plots),
    as written there."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    paths = []
    for name in only if only is not None else list(stages):
        stage = stages[name]
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


def tracked_files(root: Path) -> list[str]:
    """Files git tracks or would add (not ignored), less the pipeline's own outputs: the small
    metrics and reports committed beside dvc.lock belong to a run, not to a fresh copy."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    outputs = pipeline_outputs(root)
    return [
        p
        for p in out.stdout.split("\0")
        if p and not any(p == o or p.startswith(o.rstrip("/") + "/") for o in outputs)
    ]


def make_project_copy(dest: Path, profile: str = PROFILE) -> Project:
    """Copy the repository's files (tracked and new, not ignored) into ``dest`` and commit them."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in tracked_files(ROOT):
        src = ROOT / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    params = dest / "params.yaml"
    params.write_text(re.sub(r"(?m)^profile:.*$", f"profile: {profile}", params.read_text()))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}",
        "PREFECT_HOME": str(dest / ".prefect"),
        "OMP_NUM_THREADS": "1",
        "GIT_AUTHOR_NAME": "ci",
        "GIT_AUTHOR_EMAIL": "ci@localhost",
        "GIT_COMMITTER_NAME": "ci",
        "GIT_COMMITTER_EMAIL": "ci@localhost",
        "DVC_NO_ANALYTICS": "1",
    }
    for key in ("PREFECT_API_URL", "OPENSORA_PARENT_RUN_ID"):
        env.pop(key, None)
    project = Project(dest, env)
    project.run("git", "init", "-q", "-b", "main")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "copy of the repository for integration tests")
    return project


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return make_project_copy(tmp_path_factory.mktemp("repo"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``check()`` until it is truthy; fail with ``what`` (and the process's exit) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    from opensora_core.process import kill_process_tree

    kill_process_tree(proc, grace_s=10)


@dataclass
class PrefectServer:
    api_url: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def prefect_server(project: Project) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free loopback port, with the project's own PREFECT_HOME."""
    port = free_port()
    log = open(project.root / "prefect-server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=project.root,
        env={**project.env, "PREFECT_UI_ENABLED": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(
            lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200,
            120,
            "prefect server",
            proc,
        )
        yield PrefectServer(api, {**project.env, "PREFECT_API_URL": api})
    finally:
        stop(proc)
        log.close()


DEPLOYMENT = "opensora_pipeline/opensora-nightly"

TRIGGER = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], parameters={"root": sys.argv[2]}, timeout=float(sys.argv[3]))
print(json.dumps({"state": run.state.type.value, "name": run.name, "id": str(run.id)}))
"""

DEPLOYMENT_READY = """
import asyncio, sys
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        dep = await client.read_deployment_by_name(sys.argv[1])
        print(len(dep.schedules))

asyncio.run(main())
"""


@pytest.fixture(scope="session")
def served_deployment(project: Project, prefect_server: PrefectServer) -> Iterator[dict]:
    """``python -m flows.serve`` running against the server; yields what the server knows of it."""
    log = open(project.root / "prefect-serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--root", str(project.root)],
        cwd=project.root,
        env=prefect_server.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    info: dict = {}

    def ready() -> bool:
        out = project.python("-c", DEPLOYMENT_READY, DEPLOYMENT, check=False, env=prefect_server.env)
        if out.returncode == 0:
            info["schedules"] = int(out.stdout.strip().splitlines()[-1])
            return True
        return False

    try:
        wait_until(ready, 180, "the served deployment", proc)
        yield info
    finally:
        stop(proc)
        log.close()


def trigger_run(project: Project, server: PrefectServer, timeout: float = 1800) -> dict:
    """Run the deployment through the Prefect client; returns its state and the flow's summary."""
    out = project.python(
        "-c", TRIGGER, DEPLOYMENT, str(project.root), str(timeout), env=server.env, timeout=timeout + 60
    )
    run = json.loads(out.stdout.strip().splitlines()[-1])
    summary_path = project.root / "reports" / "pipeline_run.json"
    run["summary"] = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return run


@pytest.fixture(scope="session")
def pipeline_run(project: Project, prefect_server: PrefectServer, served_deployment: dict) -> dict:
    """The one full pipeline run of the session, on the micro profile, through the served deployment."""
    run = trigger_run(project, prefect_server)
    if run["state"] != "COMPLETED":
        logs = (project.root / "prefect-serve.log").read_text()[-8000:]
        raise AssertionError(f"pipeline run ended {run['state']}\n{logs}")
    return run
