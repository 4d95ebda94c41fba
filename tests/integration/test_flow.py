"""The Prefect flow over the DVC stages: served deployment, cached reruns, failures that must not retry."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from opensora_core.data.video_io import write_video
from tests.integration.conftest import Project, make_project_copy, trigger_run

pytestmark = pytest.mark.integration


def test_served_deployment_has_the_schedule_and_completes(pipeline_run, served_deployment) -> None:
    assert served_deployment["schedules"] == 1
    assert pipeline_run["state"] == "COMPLETED"
    stages = [s["stage"] for s in pipeline_run["summary"]["stages"]]
    assert stages[:4] == ["ingest", "meta", "validate", "shard"]
    assert all(s["status"] == "ran" for s in pipeline_run["summary"]["stages"])
    assert pipeline_run["summary"]["mlflow_run_id"]


def test_second_run_skips_every_stage(project, prefect_server, pipeline_run) -> None:
    again = trigger_run(project, prefect_server)
    assert again["state"] == "COMPLETED"
    assert {s["status"] for s in again["summary"]["stages"]} == {"skipped"}
    assert len(again["summary"]["stages"]) == len(pipeline_run["summary"]["stages"])


def test_stage_runs_nest_under_the_pipeline_run(project, pipeline_run) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("opensora")
    assert Path(exp.artifact_location.removeprefix("file://")) == project.root / "mlartifacts"
    parent = pipeline_run["summary"]["mlflow_run_id"]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    stages = {r.data.tags["stage"] for r in children}
    assert {"ingest", "meta", "validate", "shard"} <= stages


def make_bad_csv(root: Path) -> Path:
    """Two good clips and three broken files: 60% of rows fail validation."""
    import numpy as np

    media = root / "user_media"
    media.mkdir()
    frames = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    frames[:, 8:24, 8:24] = 200
    rows = []
    for i in range(2):
        write_video(media / f"good{i}.mp4", frames, fps=8)
        rows.append((f"good{i}.mp4", "a grey square on black"))
    (media / "empty.mp4").write_bytes(b"")
    (media / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
    rows.append(("empty.mp4", "an empty file"))
    rows.append(("noise.mp4", "random bytes"))
    rows.append(("gone.mp4", "a missing file"))
    csv = media / "index.csv"
    csv.write_text("path,text\n" + "".join(f"{p},{t}\n" for p, t in rows))
    return csv


def test_validation_failure_stops_the_flow_without_retry(tmp_path: Path) -> None:
    project: Project = make_project_copy(tmp_path / "repo")
    csv = make_bad_csv(project.root)
    proc: subprocess.CompletedProcess = project.python(
        "-m",
        "flows.pipeline",
        "--target",
        "validate",
        "--set",
        "ingest.source=csv",
        "--set",
        f"ingest.path={csv}",
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-4000:]
    assert "stage validate failed with exit code 3 (not retryable)" in output
    assert "quarantined" in output  # the stage's own message reaches the flow's error
    # One attempt only: each attempt logs DVC's "Running stage" line once through the task logger.
    attempts = re.findall(r"Task run 'validate[^']*' - \[validate\] Running stage 'validate'", output)
    assert len(attempts) == 1, output[-4000:]
    report = json.loads((project.root / "reports/validation.json").read_text())
    assert report["passed"] is False
    # The overrides went into the active profile, the file DVC tracks.
    assert "source: csv" in (project.root / "params/ci.yaml").read_text()


def test_bad_override_key_fails_before_any_stage(tmp_path: Path) -> None:
    project = make_project_copy(tmp_path / "repo")
    before = (project.root / "params/ci.yaml").read_text()
    proc = project.python("-m", "flows.pipeline", "--set", "shard.rows_per_shrad=3", check=False)
    assert proc.returncode == 2
    assert "unknown key 'shard.rows_per_shrad'" in proc.stderr
    assert (project.root / "params/ci.yaml").read_text() == before
    assert "Running stage" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_killed_training_is_retried_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    import sys

    import psutil

    from tests.integration.conftest import wait_until

    project = make_project_copy(tmp_path / "repo")
    root = project.root
    overrides = [
        "vae_train.steps=40",
        "vae_train.ckpt_every=4",
        "vae_train.sample_every=0",
        "vae_train.val_clips=2",
        "vae_train.buckets={32px: {9: [1.0, 2]}}",
    ]
    cmd = [sys.executable, "-m", "flows.pipeline", "--target", "vae_train"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.Popen(
        cmd, cwd=root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_until(lambda: (root / "models/vae/ckpt/step-00000004/COMPLETE").is_file(), 600, "a checkpoint", proc)
    killed = 0
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if (
            "opensora_core.jobs.train_vae" in line
            and "torch.distributed.run" not in line
            and str(root) in str(p.cwd())
        ):
            p.kill()
            killed += 1
    assert killed == 1
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-5000:]
    attempts = re.findall(r"Task run 'vae_train[^']*' - \[vae_train\] Running stage 'vae_train'", output)
    assert len(attempts) == 2, output[-5000:]  # the killed attempt and its retry
    assert "exited with 75" in output
    assert re.search(r"resumed from models/vae/ckpt/step-0000000[4-9]", output), output[-5000:]
    assert "40 steps to step 40" not in output  # the retry did not start from step 0
