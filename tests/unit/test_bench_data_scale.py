"""benchmarks/data_scale.py at a tiny size, so that the script cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.bench
@pytest.mark.slow
def test_data_scale_benchmark_runs_tiny(tmp_path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/data_scale.py"),
        "--rows", "400",
        "--meta-rows", "30",
        "--clips", "2",
        "--dvc-clips", "12",
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "30 ok of 30" in lines["meta"]
    assert "4 broken, 4 quarantined, exactly those: True" in lines["validate"]
    assert "shard: 396 rows" in lines["shard"]
    assert "Data and pipelines are up to date." in lines["dvc repro shard (no change)"]
    # 12 user clips linked in place, never copied into the project
    assert len(list((tmp_path / "user-clips-12").glob("*.mp4"))) == 12
