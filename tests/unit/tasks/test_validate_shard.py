"""The validate and shard stage CLIs: outputs, summary lines, exit codes, MLflow logging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from opensora_core.data.shards import ShardReader
from opensora_core.errors import EXIT_BAD_INPUT, EXIT_GATE, EXIT_OK
from tasks import shard as shard_task
from tasks import validate as validate_task
from tests.unit.data.test_validation import make_meta_table

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A project folder with a params file (tracking off) and a metadata table with 2 bad rows of 20."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "validate:\n  max_bad_fraction: 0.1\nshard:\n  rows_per_shard: 5\ntracking:\n  enabled: false\n"
    )
    table = make_meta_table(n_videos=16, n_stills=4)
    table.loc[2, ["status", "error"]] = ["empty", "file has zero bytes"]
    table.loc[7, "fps"] = 400.0
    (tmp_path / "data/meta").mkdir(parents=True)
    table.to_parquet(tmp_path / "data/meta/meta.parquet", index=False)
    return tmp_path


def test_validate_then_shard(workdir, capsys) -> None:
    assert validate_task.main(["-q"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "validate: 20 rows: 18 clean, 2 quarantined (10.0%)" in out
    for name in ("data/meta/clean.parquet", "data/meta/quarantine.parquet", "reports/validation.json"):
        assert (workdir / name).is_file()
    assert "PASSED" in (workdir / "reports/validation.html").read_text()

    assert shard_task.main(["-q"]) == EXIT_OK
    assert "shard: 18 rows in 4 shards (train: 13, val: 5) -> data/shards" in capsys.readouterr().out
    reader = ShardReader(workdir / "data/shards")
    reader.verify()
    clean = pd.read_parquet(workdir / "data/meta/clean.parquet")
    assert sorted(reader.columns(["path"])["path"]) == sorted(clean["path"])
    manifest = json.loads((workdir / "data/shards/manifest.json").read_text())
    assert manifest["source"]["path"] == "data/meta/clean.parquet"


def test_validate_gate_exits_3_after_writing(workdir, capsys) -> None:
    code = validate_task.main(["-q", "--set", "validate.max_bad_fraction=0.05"])
    assert code == EXIT_GATE
    err = capsys.readouterr().err
    assert "validation gate failed" in err and "10.0%" in err and "5.0%" in err and "status_ok (1)" in err
    report = json.loads((workdir / "reports/validation.json").read_text())
    assert report["passed"] is False and report["max_bad_fraction"] == 0.05
    assert len(pd.read_parquet(workdir / "data/meta/quarantine.parquet")) == 2


def test_validate_custom_paths(workdir) -> None:
    args = ["-q", "--clean", "out/c.parquet", "--quarantine", "out/q.parquet", "--report-dir", "out/r"]
    assert validate_task.main(args) == EXIT_OK
    assert {p.name for p in (workdir / "out").rglob("*") if p.is_file()} == {
        "c.parquet",
        "q.parquet",
        "validation.json",
        "validation.html",
    }


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        (validate_task, ["--input", "nowhere.parquet"]),
        (validate_task, ["--set", "validate.no_such_key=1"]),
        (validate_task, ["--set", "validate.max_bad_fraction=2"]),
        (shard_task, ["--input", "nowhere.parquet"]),
        (shard_task, ["--set", "shard.rows_per_shard=0"]),
    ],
)
def test_bad_inputs_exit_2(workdir, module, argv, capsys) -> None:
    assert module.main(["-q", *argv]) == EXIT_BAD_INPUT
    assert "error:" in capsys.readouterr().err


def test_unreadable_input_exits_2(workdir, capsys) -> None:
    (workdir / "data/meta/meta.parquet").write_text("not parquet")
    assert validate_task.main(["-q"]) == EXIT_BAD_INPUT
    assert "cannot read" in capsys.readouterr().err


def test_module_entry_points(workdir) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = subprocess.run(
        [sys.executable, "-m", "tasks.shard", "-q", "--input", "nowhere.parquet"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == EXIT_BAD_INPUT, missing.stderr
    assert "input table not found: nowhere.parquet" in missing.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "tasks.validate", "--help"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert helped.returncode == EXIT_OK and "--quarantine" in helped.stdout


def test_stages_log_to_mlflow(workdir, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("OPENSORA_PARENT_RUN_ID", raising=False)
    assert validate_task.main(["-q", "--set", "tracking.enabled=true"]) == EXIT_OK
    assert shard_task.main(["-q", "--set", "tracking.enabled=true"]) == EXIT_OK

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("opensora")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}
    validate_run, shard_run = runs["validate"], runs["shard"]
    assert validate_run.info.status == "FINISHED"
    assert (
        validate_run.data.metrics["clean_rows"] == 18 and validate_run.data.metrics["quarantined_rows"] == 2
    )
    assert validate_run.data.metrics["unexpected.fps_range"] == 1
    assert validate_run.data.params["validate.max_bad_fraction"] == "0.1"
    files = {a.path for a in client.list_artifacts(validate_run.info.run_id, "validation")}
    assert files == {"validation/validation.json", "validation/validation.html"}
    assert shard_run.data.metrics["rows"] == 18 and shard_run.data.metrics["shards"] == 4
    manifest = json.loads((workdir / "data/shards/manifest.json").read_text())
    assert shard_run.data.tags["data.content_hash"] == manifest["content_hash"]
    assert [a.path for a in client.list_artifacts(shard_run.info.run_id, "shards")] == [
        "shards/manifest.json"
    ]
