"""A user's own dataset without labels through the DVC pipeline to the registry: a folder of captioned
mp4 clips, then a CSV of them, on the micro profile in a copy of the repository.

The clips are the session pipeline's MovingShapes mp4s, copied into a folder with a ``.txt``
caption each (no ``labels.parquet`` of theirs comes along). ``dvc repro shard`` ingests, probes,
validates and shards them; the session's trained VAE and diffusion stages are then copied in and
``dvc commit``-ed (training is tested elsewhere; what is under test is that unlabeled data reaches
evaluate and register), and ``dvc repro register`` runs evaluate and register for real, against a
copy of the session's registry, whose champion was evaluated on labelled data.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.integration.conftest import Project, make_project_copy, pipeline_outputs

TRAINING_STAGES = ["vae_train", "vae_stats", "diffusion_stage1", "diffusion_stage2", "diffusion_stage3"]


def set_ingest(repo: Path, source: str, path: str) -> None:
    """params.yaml's ingest source and path (and a val share that holds out a few of 20 clips)."""
    params = repo / "params.yaml"
    text = params.read_text()
    text = re.sub(r"(?m)^  source: .*$", f"  source: {source}", text, count=1)
    text = re.sub(r"(?m)^  path: .*$", f'  path: "{path}"', text, count=1)
    text = re.sub(r"(?m)^  val_fraction: .*$", "  val_fraction: 0.3", text, count=1)
    params.write_text(text)


def reuse_trained_models(session: Project, repo: Project) -> None:
    """The session's trained stages' outputs, committed to this copy's DVC for its new shards."""
    for rel in pipeline_outputs(repo.root, only=TRAINING_STAGES):
        src, dst = session.root / rel, repo.root / rel
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    repo.dvc("commit", "-f", "-q", *TRAINING_STAGES)


def run_through_register(session: Project, repo: Project) -> str:
    """``dvc repro shard``, the trained models committed, then ``dvc repro register``; its stdout."""
    repo.dvc("repro", "shard")
    reuse_trained_models(session, repo)
    return repo.dvc("repro", "register").stdout


@pytest.fixture(scope="module")
def user_repo(project: Project, pipeline_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Project:
    repo = make_project_copy(tmp_path_factory.mktemp("userdata"))
    shutil.copy2(project.root / "mlflow.db", repo.root / "mlflow.db")  # the session's registry
    index = pd.read_csv(project.root / "data" / "raw" / "index.csv", keep_default_na=False)
    clips = index[index["path"].str.endswith(".mp4")].reset_index(drop=True)
    folder = repo.root / "data" / "user"
    folder.mkdir(parents=True)
    for i, row in clips.iterrows():
        shutil.copy2(project.root / row["path"], folder / f"clip{i:03d}.mp4")
        (folder / f"clip{i:03d}.txt").write_text(row["text"] + "\n")
    repo.captions = set(clips["text"])  # type: ignore[attr-defined]
    repo.seconds = {}  # type: ignore[attr-defined]
    return repo


def latest_version(repo: Project) -> int:
    """The newest registered version of opensora-t2v in the copy's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo.root / 'mlflow.db'}")
    return max(int(v.version) for v in client.search_model_versions("name='opensora-t2v'"))


def check_unlabeled_run(repo: Project, out: str, version_before: int) -> dict:
    """What evaluate and register must show for data without labels; returns the registry record."""
    assert "Running stage 'evaluate'" in out and "Running stage 'register'" in out
    assert "Running stage 'vae_train'" not in out and "Running stage 'diffusion_stage1'" not in out
    labels = pd.read_parquet(repo.root / "data/raw/labels.parquet")
    assert labels.empty  # written by ingest for the user's source: no ground truth

    metrics = json.loads((repo.root / "metrics/eval.json").read_text())
    assert all(metrics[k] is None for k in ("adherence_color", "adherence_motion", "adherence_shape"))
    assert metrics["val_loss"] > 0 and metrics["vae_psnr"] > 0 and metrics["vae_ssim"] is not None
    assert metrics["fvd_vae"] > 0 and metrics["fvd_vae_real_clips"] >= 2
    prompts = [p.read_text().splitlines()[0] for p in (repo.root / "reports/eval/samples").glob("*.txt")]
    assert prompts and all(any(c in p for c in repo.captions) for p in prompts)  # type: ignore[attr-defined]
    assert not (repo.root / "reports/eval/adherence.csv").exists()

    record = json.loads((repo.root / "models/registry.json").read_text())
    assert int(record["version"]) == version_before + 1 and "candidate" in record["aliases"]
    assert record["compare_metric"] == "fvd_vae" and record["compare_metric_configured"] == "adherence_color"
    assert record["reason"].startswith("no adherence_color, compared on fvd_vae")
    assert record["gate"]["passed"] is True

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo.root / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("opensora").experiment_id],
        "tags.stage = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    assert "no ground truth" in run.data.tags["adherence_skipped"]
    assert run.data.metrics["fvd_vae"] == pytest.approx(metrics["fvd_vae"], rel=1e-5)
    assert "Data and pipelines are up to date." in repo.dvc("status").stdout
    return record


def test_a_folder_without_labels_reaches_evaluate_and_register(project: Project, user_repo: Project) -> None:
    before = latest_version(user_repo)  # the session's champion, evaluated on labelled data
    start = time.perf_counter()
    set_ingest(user_repo.root, "folder", "data/user")
    out = run_through_register(project, user_repo)
    user_repo.seconds["folder"] = time.perf_counter() - start  # type: ignore[attr-defined]
    check_unlabeled_run(user_repo, out, before)
    index = pd.read_csv(user_repo.root / "data/raw/index.csv")
    assert index["path"].str.startswith("data/user/clip").all()
    user_repo.folder_index = index  # type: ignore[attr-defined]


def test_a_csv_without_labels_reaches_evaluate_and_register(project: Project, user_repo: Project) -> None:
    before = latest_version(user_repo)
    start = time.perf_counter()
    catalog = user_repo.root / "data" / "catalog"
    catalog.mkdir(parents=True, exist_ok=True)
    clips = sorted((user_repo.root / "data" / "user").glob("*.mp4"))
    pd.DataFrame(
        {
            "path": [f"../user/{c.name}" for c in clips],
            "text": [c.with_suffix(".txt").read_text().strip() for c in clips],
        }
    ).to_csv(catalog / "clips.csv", index=False)
    set_ingest(user_repo.root, "csv", "data/catalog/clips.csv")
    out = run_through_register(project, user_repo)
    user_repo.seconds["csv"] = time.perf_counter() - start  # type: ignore[attr-defined]
    check_unlabeled_run(user_repo, out, before)
    # the same files by other names: the CSV's paths resolve to them, its own keys split them anew
    index = pd.read_csv(user_repo.root / "data/raw/index.csv")
    folder_index = getattr(user_repo, "folder_index", None)
    if folder_index is not None:
        assert index["path"].tolist() == folder_index["path"].tolist()
        assert index["split"].tolist() != folder_index["split"].tolist()

    # Gating on adherence, which this data cannot measure, is refused by name before registering.
    bad = user_repo.python("-m", "tasks.register", "--set", "register.gate.adherence_color=0.5", check=False)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "register.gate.adherence_color" in bad.stderr + bad.stdout
    assert latest_version(user_repo) == before + 1  # nothing new registered
    print(f"user-data pipeline seconds: {user_repo.seconds}")  # type: ignore[attr-defined]
