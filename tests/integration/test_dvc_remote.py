"""The DVC remote round trip of the session's pipeline run, as a team shares a run.

The session copy gets a default remote (a local folder, as ``s3://``/``gs://`` would be), its run is
committed beside ``dvc.lock`` (the ``cache: false`` metrics, plots and reports) and pushed. A fresh
``git clone`` with its own, empty DVC cache pulls everything back: ``dvc status`` is clean,
``dvc repro`` reruns no stage, and the pulled models and checkpoints are the pushed bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Project

pytestmark = pytest.mark.integration

# Run results committed to git beside dvc.lock (cache: false in dvc.yaml).
COMMITTED = [".dvc/config", "dvc.lock", "metrics", "reports", "models/registry.json"]
# What a clone needs to sample, evaluate or continue training: pulled from the remote.
PULLED = ["models/vae/final", "models/vae/latent_stats.json", "models/vae/ckpt", "data/shards"] + [
    f"models/diffusion/{name}/{kind}" for name in ("stage1", "stage2", "stage3") for kind in ("final", "ckpt")
]


def sha256_files(root: Path, rels: list[str]) -> dict[str, str]:
    """sha256 of every file at or under each of ``rels``, keyed by its path relative to ``root``."""
    digests: dict[str, str] = {}
    for rel in rels:
        top = root / rel
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def test_a_clone_pulls_the_run_from_the_remote_and_reruns_nothing(
    project: Project, pipeline_run: dict, tmp_path: Path
) -> None:
    root = project.root
    remote = tmp_path / "remote"
    # 1. the run's side: a default remote, the run committed beside dvc.lock, then pushed
    project.dvc("remote", "add", "-d", "storage", str(remote))
    project.run("git", "add", *COMMITTED)
    staged = set(project.run("git", "diff", "--cached", "--name-only").stdout.split())
    expected = {"dvc.lock", "metrics/eval.json", "metrics/vae.json", "models/registry.json"}
    assert expected | {"reports/validation.json", "reports/ingest_preview.png"} <= staged, sorted(staged)
    assert not any(p.startswith(("reports/eval/", "reports/vae/")) for p in staged)  # cached media
    project.run("git", "commit", "-q", "-m", "pipeline run: dvc.lock, metrics and reports")
    project.dvc("push")
    assert any(remote.rglob("*")), "nothing reached the remote"

    # 2. another machine: a fresh clone, its own empty DVC cache, dvc pull
    clone = Project(tmp_path / "clone", {**project.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/c.db"})
    project.run("git", "clone", "-q", str(root), str(clone.root))
    assert not (clone.root / ".dvc" / "cache").exists() and not (clone.root / "models/vae").exists()
    clone.dvc("pull")

    # 3. DVC sees the run as done: a clean status and a repro that runs no stage
    status = clone.dvc("status")
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    again = clone.dvc("repro")
    stages = yaml.safe_load((clone.root / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout, again.stdout
    assert "Running stage" not in again.stdout and "Data and pipelines are up to date." in again.stdout
    assert clone.run("git", "status", "--porcelain").stdout == ""  # dvc.lock untouched

    # 4. the pulled models, checkpoints and shards are the pushed bytes
    original = sha256_files(root, PULLED)
    assert any(p.endswith("FINISHED.json") for p in original)  # the resume state travels
    assert sha256_files(clone.root, PULLED) == original
