"""The meta stage: its table on real files, its CLI's exit codes, and that it starts light."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from opensora_core.config import MetaConfig
from opensora_core.data.probe import META_COLUMNS
from opensora_core.data.video_io import write_image, write_video
from opensora_core.errors import InputError
from tasks.meta import main, meta

ROOT = Path(__file__).resolve().parents[3]
HEAVY_MODULES = ("torch", "colossalai", "diffusers", "great_expectations", "mlflow")


def frames(num_frames: int, height: int, width: int) -> np.ndarray:
    t = np.arange(num_frames)[:, None, None, None]
    x = np.arange(width)[None, None, :, None]
    return np.broadcast_to((x * 4 + t * 16) % 256, (num_frames, height, width, 3)).astype(np.uint8)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root (the current directory) with clips, an index of relative paths, params."""
    monkeypatch.chdir(tmp_path)
    raw = Path("data/raw")
    write_video(raw / "clip0.mp4", frames(17, 48, 64), 12, faststart=True)
    write_video(raw / "clip1.mp4", frames(33, 64, 96), 24, faststart=True)
    write_image(raw / "still.png", frames(1, 32, 32)[0])
    (raw / "zero.mp4").write_bytes(b"")
    data = (raw / "clip1.mp4").read_bytes()
    (raw / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    index = pd.DataFrame(
        {
            "path": [
                f"data/raw/{n}"
                for n in ("clip0.mp4", "zero.mp4", "still.png", "gone.mp4", "cut.mp4", "clip1.mp4")
            ],
            "text": ["a red circle", "", "NA", "a blue square", "a green star", "None"],
            "split": ["train", "train", "val", "train", "train", "val"],
        }
    )
    index.to_csv(raw / "index.csv", index=False)
    Path("params.yaml").write_text(
        yaml.safe_dump({"meta": {"num_workers": 0, "progress": False}, "tracking": {"enabled": False}})
    )
    return tmp_path


def test_stage_adds_columns_keeps_rows_and_carries_text(project: Path) -> None:
    summary = meta("data/raw/index.csv", "data/meta/meta.parquet", MetaConfig(num_workers=0, progress=False))
    table = pd.read_parquet("data/meta/meta.parquet")
    assert list(table.columns) == ["path", "text", "split", *META_COLUMNS]
    assert table["path"].tolist()[0] == "data/raw/clip0.mp4"  # paths are carried as given
    assert table["status"].tolist() == ["ok", "empty", "ok", "missing", "truncated", "ok"]
    assert table["text"].tolist() == ["a red circle", "", "NA", "a blue square", "a green star", "None"]
    assert table.loc[0, ["num_frames", "height", "width"]].tolist() == [17, 48, 64]
    assert table.loc[5, ["num_frames", "height", "width"]].tolist() == [33, 64, 96]
    assert table.loc[0, "aspect_ratio"] == pytest.approx(48 / 64)
    assert table.loc[0, "resolution"] == 48 * 64
    assert table.loc[0, "error"] == "" and "33" in table.loc[4, "error"]
    assert str(summary).startswith("6 rows: 3 ok, 1 missing, 1 empty, 1 truncated")
    assert summary.metrics()["status_ok"] == 3 and summary.metrics()["rows"] == 6


def test_two_workers_write_the_same_table_as_serial(project: Path) -> None:
    cfg = MetaConfig(num_workers=0, progress=False)
    meta("data/raw/index.csv", "serial.parquet", cfg)
    meta("data/raw/index.csv", "parallel.parquet", cfg, num_workers=2)
    pd.testing.assert_frame_equal(pd.read_parquet("serial.parquet"), pd.read_parquet("parallel.parquet"))


def test_stage_input_errors(project: Path) -> None:
    cfg = MetaConfig(num_workers=0, progress=False)
    with pytest.raises(InputError, match="not found"):
        meta("data/raw/nope.csv", "out.parquet", cfg)
    Path("nopath.csv").write_text("file,text\na.mp4,x\n")
    with pytest.raises(InputError, match="no 'path' column"):
        meta("nopath.csv", "out.parquet", cfg)
    assert not Path("out.parquet").exists()


def test_cli_csv_output_and_summary(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--input", "data/raw/index.csv", "--output", "data/meta/meta.csv", "--num-workers", "2", "-q"])
    assert rc == 0
    table = pd.read_csv("data/meta/meta.csv", keep_default_na=False)
    assert table["status"].tolist() == ["ok", "empty", "ok", "missing", "truncated", "ok"]
    assert "meta: 6 rows: 3 ok" in capsys.readouterr().out


def test_cli_exit_code_2_on_bad_input_or_key(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--input", "missing.csv", "--output", "out.parquet"]) == 2
    assert "input CSV not found" in capsys.readouterr().err
    assert main(["--input", "data/raw/index.csv", "--set", "meta.workers=3"]) == 2
    err = capsys.readouterr().err
    assert "meta.workers" in err and "num_workers" in err
    assert not Path("data/meta/meta.parquet").exists()


LIGHTNESS_SCRIPT = """
import json, sys
from tasks.meta import main
try:
    main(["--help"])
except SystemExit:
    pass
after_help = [m for m in HEAVY if m in sys.modules]
rc = main(["--input", "data/raw/index.csv", "--output", "data/meta/meta.parquet", "-q"])
print(json.dumps({"rc": rc, "after_help": after_help, "after_run": [m for m in HEAVY if m in sys.modules]}))
"""


def test_cli_imports_nothing_heavy_and_logs_to_mlflow_in_a_child(project: Path) -> None:
    # Tracking on, into this test's own sqlite store: MLflow runs only in the child process.
    Path("params.yaml").write_text(yaml.safe_dump({"meta": {"num_workers": 2, "progress": False}}))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }
    script = f"HEAVY = {HEAVY_MODULES!r}\n{LIGHTNESS_SCRIPT}"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "after_help": [], "after_run": []}
    assert Path("data/meta/meta.parquet").is_file()
    with sqlite3.connect(project / "mlflow.db") as db:
        metrics = dict(db.execute("SELECT key, value FROM latest_metrics").fetchall())
    assert metrics["rows"] == 6 and metrics["status_ok"] == 3 and metrics["rows_per_s"] > 0


def test_content_fingerprint_follows_the_bytes_into_the_shard_manifest(project: Path) -> None:
    import hashlib

    from opensora_core.config import ShardConfig
    from opensora_core.data.shards import write_shards

    cfg = MetaConfig(num_workers=0, progress=False)

    def manifest_hash(tag: str) -> tuple[pd.DataFrame, str]:
        meta("data/raw/index.csv", f"data/meta/{tag}.parquet", cfg)
        table = pd.read_parquet(f"data/meta/{tag}.parquet")
        ok = table[table["status"] == "ok"].reset_index(drop=True)
        write_shards(ok, f"data/shards-{tag}", ShardConfig(rows_per_shard=2), progress=False)
        return table, json.loads(Path(f"data/shards-{tag}/manifest.json").read_text())["content_hash"]

    first, hash_first = manifest_hash("a")
    assert first.loc[0, "sha256"] == hashlib.sha256(Path("data/raw/clip0.mp4").read_bytes()).hexdigest()
    assert first["sha256"].tolist()[1] == "" and first["sha256"].tolist()[3] == ""  # empty, missing
    assert first.loc[2, "sha256"] == hashlib.sha256(Path("data/raw/still.png").read_bytes()).hexdigest()

    again, hash_again = manifest_hash("b")  # same bytes: same fingerprints, same shards
    assert again["sha256"].tolist() == first["sha256"].tolist() and hash_again == hash_first

    # a user replaces clip0's content under the same path, same size, length and rate
    replaced = 255 - frames(17, 48, 64)
    write_video(Path("data/raw/clip0.mp4"), replaced, 12, faststart=True)
    after, hash_after = manifest_hash("c")
    probed = [c for c in META_COLUMNS if c != "sha256"]
    assert after.loc[0, probed].tolist() == first.loc[0, probed].tolist()  # the probe alone sees no change
    assert after.loc[0, "sha256"] != first.loc[0, "sha256"]
    assert after["sha256"].tolist()[1:] == first["sha256"].tolist()[1:]
    assert hash_after != hash_first
