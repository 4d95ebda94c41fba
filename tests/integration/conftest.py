"""A temporary copy of the repository on the ``params/ci.yaml`` micro profile.

The copy has its own git, DVC cache, MLflow store and PREFECT_HOME, so integration tests never
touch the working tree. One pipeline run (``dvc repro``) is shared by the whole session.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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


def tracked_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return [p for p in out.stdout.split("\0") if p]


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


@pytest.fixture(scope="session")
def pipeline_run(project: Project) -> subprocess.CompletedProcess:
    """The one full ``dvc repro`` of the session on the micro profile."""
    return project.dvc("repro")
