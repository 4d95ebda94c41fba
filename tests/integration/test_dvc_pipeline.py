"""The DAG of record after the session's pipeline run: outputs, a no-op second repro, precise params."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytestmark = pytest.mark.integration


def test_data_stages_produce_their_outputs(project, pipeline_run) -> None:
    root = project.root
    index = pd.read_csv(root / "data/raw/index.csv")
    assert list(index.columns) == ["path", "text", "split"]
    assert set(index["split"]) == {"train", "val"}
    meta = pd.read_parquet(root / "data/meta/meta.parquet")
    assert len(meta) == len(index)
    assert (meta["status"] == "ok").all()
    clean = pd.read_parquet(root / "data/meta/clean.parquet")
    manifest = json.loads((root / "data/shards/manifest.json").read_text())
    assert sum(manifest["rows_per_split"].values()) == len(clean)
    shard_rows = sum(len(pd.read_parquet(root / "data/shards" / s["file"])) for s in manifest["shards"])
    assert shard_rows == len(clean)
    report = json.loads((root / "reports/validation.json").read_text())
    assert report["passed"] is True


def test_second_repro_does_nothing(project, pipeline_run) -> None:
    status = project.dvc("status")
    assert "up to date" in status.stdout.lower(), status.stdout
    again = project.dvc("repro")
    assert "Running stage" not in again.stdout, again.stdout


def test_profile_change_marks_only_the_stage_that_reads_it(project, pipeline_run) -> None:
    params = project.root / "params/ci.yaml"
    original = params.read_text()
    assert "rows_per_shard: 8" in original
    try:
        params.write_text(original.replace("rows_per_shard: 8", "rows_per_shard: 5"))
        changed = json.loads(project.dvc("status", "--json").stdout)
    finally:
        params.write_text(original)
    assert list(changed) == ["shard"], changed
    assert json.loads(project.dvc("status", "--json").stdout or "{}") == {}
