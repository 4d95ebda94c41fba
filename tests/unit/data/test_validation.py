"""The validate stage's core: the GX suite, row routing by row id, the gate and the reports."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from opensora_core.config import ValidateConfig
from opensora_core.data.validation import (
    HELPER_COLUMNS,
    build_checks,
    check_gate,
    validate,
    write_validation,
)
from opensora_core.errors import GateFailed, InputError


def make_meta_table(n_videos: int = 8, n_stills: int = 2, val_every: int = 4) -> pd.DataFrame:
    """A metadata table as the meta stage writes it: every row valid."""
    rows = []
    for i in range(n_videos + n_stills):
        still = i >= n_videos
        height, width = [(64, 64), (48, 64), (64, 48)][i % 3]
        num_frames = 1 if still else 9 + 8 * (i % 2)
        fps = math.nan if still else float([8, 12, 24][i % 3])
        rows.append(
            {
                "path": f"data/raw/{'still' if still else 'clip'}_{i:03d}.{'png' if still else 'mp4'}",
                "text": f"a red circle moving left, clip {i}",
                "split": "val" if i % val_every == 0 else "train",
                "num_frames": num_frames,
                "height": height,
                "width": width,
                "aspect_ratio": height / width,
                "resolution": height * width,
                "fps": fps,
                "duration": math.nan if still else num_frames / fps,
                "codec": "png" if still else "h264",
                "status": "ok",
                "error": "",
            }
        )
    return pd.DataFrame(rows)


def failed_of(result, input_row: int) -> list[str]:
    q = result.quarantine
    match = q[q["input_row"] == input_row]
    return match["failed_expectations"].iloc[0].split(",") if len(match) else []


def test_valid_table_is_all_clean() -> None:
    table = make_meta_table()
    result = validate(table, ValidateConfig())
    assert len(result.clean) == len(table) and result.quarantine.empty
    assert list(result.clean.columns) == list(table.columns)
    pd.testing.assert_frame_equal(result.clean, table)
    assert result.report["passed"] and result.report["bad_fraction"] == 0.0
    assert result.summary() == "10 rows: 10 clean, 0 quarantined (0.0%)"


def test_still_with_nan_fps_passes() -> None:
    table = make_meta_table(n_videos=1, n_stills=1)
    assert table.loc[1, "num_frames"] == 1 and math.isnan(table.loc[1, "fps"])
    result = validate(table, ValidateConfig())
    assert len(result.clean) == 2


# (expectation, row to change, {column: new value}); row 0 is a video, row 8 a still.
CASES = [
    ("status_present", 0, {"status": None}),
    ("status_ok", 0, {"status": "truncated", "error": "stream ends early", "num_frames": math.nan}),
    ("path_present", 0, {"path": None}),
    ("text_present", 0, {"text": None}),
    ("text_min_length", 0, {"text": "   "}),
    ("num_frames_present", 8, {"num_frames": math.nan}),
    ("num_frames_min", 8, {"num_frames": 0}),
    ("height_present", 0, {"height": math.nan}),
    ("height_range", 0, {"height": 8}),
    ("width_present", 0, {"width": math.nan}),
    ("width_range", 0, {"width": 9000}),
    ("aspect_ratio_present", 0, {"aspect_ratio": math.nan}),
    ("aspect_ratio_range", 0, {"aspect_ratio": 5.0}),
    ("fps_present", 0, {"fps": math.nan}),
    ("fps_range", 0, {"fps": 500.0}),
    ("fps_range", 1, {"fps": 0.5}),
]


@pytest.mark.parametrize(("name", "row", "change"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_each_expectation_quarantines_its_row(name: str, row: int, change: dict) -> None:
    table = make_meta_table()
    for col, value in change.items():
        table.loc[row, col] = value
    result = validate(table, ValidateConfig())
    assert failed_of(result, row) == [name]
    assert len(result.quarantine) == 1 and len(result.clean) == len(table) - 1
    subject = re.sub(r"_(present|ok|min_length|min|range)$", "", name)  # the column it checks
    assert result.quarantine["reason"].iloc[0].startswith(f"{subject} ")
    entry = next(e for e in result.report["expectations"] if e["name"] == name)
    assert entry["unexpected_count"] == 1 and entry["quarantined_count"] == 1 and not entry["success"]


def test_every_expectation_has_a_case() -> None:
    names = {chk.name for chk in build_checks(ValidateConfig())}
    assert names - {c[0] for c in CASES} == {"path_unique"}


def test_text_length_threshold_comes_from_config() -> None:
    table = make_meta_table(n_videos=2, n_stills=0)
    table.loc[1, "text"] = "  abcd  "
    assert len(validate(table, ValidateConfig(min_text_length=4)).clean) == 2
    result = validate(table, ValidateConfig(min_text_length=5))
    assert failed_of(result, 1) == ["text_min_length"]


def test_not_ok_row_reports_status_only() -> None:
    table = make_meta_table(n_videos=3, n_stills=0)
    for col in ("num_frames", "height", "width", "aspect_ratio", "fps"):
        table.loc[2, col] = math.nan
    table.loc[2, ["status", "error"]] = ["missing", "file not found: data/raw/clip_002.mp4"]
    result = validate(table, ValidateConfig())
    assert failed_of(result, 2) == ["status_ok"]
    assert result.quarantine["reason"].iloc[0] == "status is 'missing': file not found: data/raw/clip_002.mp4"
    assert result.quarantine["status"].iloc[0] == "missing"


def test_duplicates_are_routed_by_row_id_first_occurrence_stays() -> None:
    table = make_meta_table()
    table.loc[[3, 6], "path"] = table.loc[1, "path"]
    table.loc[3, "text"] = "second caption"
    result = validate(table, ValidateConfig())
    assert sorted(result.quarantine["input_row"]) == [3, 6]
    assert failed_of(result, 3) == ["path_unique"] and failed_of(result, 6) == ["path_unique"]
    kept = result.clean[result.clean["path"] == table.loc[1, "path"]]
    assert len(kept) == 1 and kept["text"].iloc[0] == table.loc[1, "text"]
    assert "input row 1 stays clean" in result.quarantine["reason"].iloc[0]
    entry = next(e for e in result.report["expectations"] if e["name"] == "path_unique")
    assert entry["unexpected_count"] == 3 and entry["quarantined_count"] == 2


def test_duplicate_keeps_first_occurrence_that_passes_everything_else() -> None:
    table = make_meta_table(n_videos=4, n_stills=0)
    table.loc[2, "path"] = table.loc[0, "path"]
    table.loc[0, "fps"] = 1000.0
    result = validate(table, ValidateConfig())
    assert failed_of(result, 0) == ["path_unique", "fps_range"]
    assert failed_of(result, 2) == []
    assert table.loc[0, "path"] in set(result.clean["path"])


def test_input_index_does_not_matter() -> None:
    table = make_meta_table().iloc[::-1]
    table.index = table.index * 10 + 7
    table.iloc[0, table.columns.get_loc("height")] = 5
    result = validate(table, ValidateConfig())
    assert list(result.quarantine["input_row"]) == [0]
    assert result.quarantine["path"].iloc[0] == table["path"].iloc[0]
    assert list(result.clean.index) == list(range(len(table) - 1))


def test_missing_columns_are_an_input_error() -> None:
    with pytest.raises(InputError, match="fps"):
        validate(make_meta_table().drop(columns=["fps"]), ValidateConfig())


def test_empty_table_passes() -> None:
    result = validate(make_meta_table().iloc[:0], ValidateConfig())
    assert result.report["rows"] == 0 and result.report["passed"]
    assert result.summary() == "0 rows: 0 clean, 0 quarantined (0.0%)"


def test_gate_fails_above_threshold_and_passes_at_it() -> None:
    table = make_meta_table()  # 10 rows
    table.loc[0, "status"] = "unreadable"
    table.loc[[1, 2], "fps"] = 900.0
    result = validate(table, ValidateConfig(max_bad_fraction=0.3))
    assert result.report["bad_fraction"] == pytest.approx(0.3) and result.passed
    check_gate(result)
    failing = validate(table, ValidateConfig(max_bad_fraction=0.25))
    with pytest.raises(GateFailed) as info:
        check_gate(failing)
    message = str(info.value)
    assert (
        "30.0%" in message
        and "25.0%" in message
        and "fps_range (2)" in message
        and "status_ok (1)" in message
    )


def test_reports_are_written(tmp_path) -> None:
    table = make_meta_table()
    table.loc[4, "text"] = ""
    table.loc[5, "height"] = 20000
    result = validate(table, ValidateConfig())
    paths = write_validation(
        result, tmp_path / "m/clean.parquet", tmp_path / "m/quarantine.parquet", tmp_path / "r"
    )

    clean = pd.read_parquet(paths["clean"])
    quarantine = pd.read_parquet(paths["quarantine"])
    assert len(clean) == 8 and not set(HELPER_COLUMNS) & set(clean.columns)
    assert sorted(quarantine["input_row"]) == [4, 5]
    assert list(quarantine.columns) == [*table.columns, "input_row", "failed_expectations", "reason"]

    report = json.loads(paths["json"].read_text())
    assert report["rows"] == 10 and report["clean"] == 8 and report["quarantined"] == 2
    assert report["bad_fraction"] == pytest.approx(0.2) and report["passed"] is False
    assert report["thresholds"]["max_bad_fraction"] == 0.1
    assert report["quarantined_by_expectation"] == {"height_range": 1, "text_min_length": 1}
    assert {e["name"]: e["unexpected_count"] for e in report["expectations"]}["height_range"] == 1
    assert report["clean_by_split"] == {"train": int((clean["split"] == "train").sum()), "val": 2}

    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "FAILED" in page
    assert "height 20000 outside [16, 8192] px" in page and "text_min_length" in page
    assert "<script" not in page and "<link" not in page and "http" not in page


def test_html_escapes_captions(tmp_path) -> None:
    table = make_meta_table(n_videos=2, n_stills=0)
    table.loc[0, "path"] = "<b>bad</b>.mp4"
    table.loc[0, "fps"] = np.nan
    result = validate(table, ValidateConfig())
    paths = write_validation(result, tmp_path / "c.parquet", tmp_path / "q.parquet", tmp_path)
    page = paths["html"].read_text()
    assert "&lt;b&gt;bad&lt;/b&gt;.mp4" in page and "<b>bad</b>" not in page
