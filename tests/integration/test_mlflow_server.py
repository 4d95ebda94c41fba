"""A training stage, evaluate and register against a real MLflow tracking server on loopback.

``mlflow server --backend-store-uri sqlite:///... --artifacts-destination FOLDER`` runs on a free
127.0.0.1 port; the stage CLIs see it only through ``MLFLOW_TRACKING_URI=http://127.0.0.1:P``.
The project copy holds tiny trained-model folders (so evaluate needs no trained pipeline before
it): evaluate runs its real torchrun job and register logs and registers the real pyfunc model. A
fresh process then generates a video from ``models:/opensora-t2v@champion`` through
``tasks.sample``. Last, the micro ``diffusion_stage1`` (4 steps, a torchrun job) trains on the
copy's shards and logs its loss history, loss CSV and sample grid PNG to the server.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from opensora_core.data.video_io import read_video
from tests.integration.conftest import free_port, make_project_copy, stop, wait_until
from tests.unit.tasks._tiny_t2v import write_eval_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVAL_SETS = [
    "evaluate.num_steps=2",
    "evaluate.num_prompts=2",
    "evaluate.val_timesteps=[0.3, 0.8]",
    "evaluate.max_val_clips=3",
]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[dict]:
    """``mlflow server`` on a free loopback port with a sqlite store and a local artifact folder."""
    port = free_port()
    store, artifacts = tmp_path / "server", tmp_path / "server" / "artifacts"
    artifacts.mkdir(parents=True)
    log = open(store / "server.log", "w")  # noqa: SIM115 - closed below
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=store,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, 90, "mlflow", proc
        )
        yield {"uri": uri, "artifacts": artifacts, "log": store / "server.log"}
    finally:
        stop(proc)
        log.close()


def test_stages_track_and_register_on_a_server_and_champion_loads_from_it(
    tmp_path: Path, mlflow_server: dict
) -> None:
    from mlflow import MlflowClient

    project = make_project_copy(tmp_path / "repo")
    models = write_eval_project(project.root)
    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    model = str(models["diffusion"].relative_to(project.root))
    sets = [arg for s in EVAL_SETS for arg in ("--set", s)]

    # 1. evaluate (a torchrun job) and register, each logging its own run to the server
    project.python("-m", "tasks.evaluate", "--model", model, *sets, env=env)
    project.python("-m", "tasks.register", "--model", model, env=env)
    record = json.loads((project.root / "models/registry.json").read_text())
    assert record["model_name"] == "opensora-t2v" and "champion" in record["aliases"]

    # 2. a fresh process generates from the champion, resolved through the server's registry
    out_dir = tmp_path / "samples"
    project.python(
        "-m", "tasks.sample", "--model", "models:/opensora-t2v@champion", "--prompt", "a red circle",
        "--num-steps", "2", "--save-dir", str(out_dir), "-q", env=env,
    )  # fmt: skip
    videos = sorted(out_dir.glob("*.mp4"))
    assert len(videos) == 1
    frames, _ = read_video(videos[0])
    assert frames.shape[0] >= 1 and frames.shape[-1] == 3

    # 3. a training stage (torchrun, rank 0 logs) on the copy's shards, after the champion was used
    project.python("-m", "tasks.diffusion_train", "--stage", "stage1", env=env)
    loss_rows = (project.root / "metrics/diffusion_stage1_loss.csv").read_text().splitlines()[1:]

    # 4. what the server holds: proxied artifact locations only, both stage runs, the champion
    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    experiments = client.search_experiments()
    assert experiments
    for exp in experiments:
        assert not exp.artifact_location.startswith("file:"), (exp.name, exp.artifact_location)
    exp = client.get_experiment_by_name("opensora")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags.get("stage", r.info.run_name): r for r in runs}
    assert {"evaluate", "register", "diffusion_stage1"} <= set(by_stage), sorted(by_stage)
    evaluate_run = by_stage["evaluate"]
    metrics = json.loads((project.root / "metrics/eval.json").read_text())
    assert evaluate_run.data.metrics["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    champion = client.get_model_version_by_alias("opensora-t2v", "champion")
    assert champion.run_id == record["run_id"] == by_stage["register"].info.run_id
    train_run = by_stage["diffusion_stage1"]
    history = client.get_metric_history(train_run.info.run_id, "loss")
    assert [m.step for m in history] == [int(row.split(",")[0]) for row in loss_rows]  # log_every 2
    assert all(math.isfinite(m.value) for m in history) and "final_loss" in train_run.data.metrics
    logged = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    samples = {a.path for a in client.list_artifacts(train_run.info.run_id, "samples")}
    assert {"diffusion_stage1_loss.csv", "diffusion_stage1_loss.png"} <= logged and any(
        s.endswith(".png") for s in samples
    ), logged

    # The files went to the server's --artifacts-destination, none to a local mlartifacts/.
    stored = {p.name for p in mlflow_server["artifacts"].rglob("*") if p.is_file()}
    assert "MLmodel" in stored and any(name.endswith(".mp4") for name in stored), sorted(stored)[:20]
    assert not (project.root / "mlartifacts").exists()
    assert not (project.root / "mlflow.db").exists()
