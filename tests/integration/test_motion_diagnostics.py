"""``benchmarks/motion_diagnostics.py`` on the outputs of the session's pipeline run (micro profile)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_motion_diagnostics_measures_every_clip_and_the_requested_prompts(
    project, pipeline_run, tmp_path
) -> None:
    out = tmp_path / "diagnostics.json"
    missing = project.python(
        "benchmarks/motion_diagnostics.py", "--model", str(tmp_path / "none"), check=False
    )
    assert missing.returncode != 0 and "mmdit_config.json not found" in missing.stderr
    proc = project.python("benchmarks/motion_diagnostics.py", "--prompts", "3", "--out", str(out))
    result = json.loads(out.read_text())

    labels = pd.read_parquet(project.root / "data" / "raw" / "labels.parquet")
    assert result["roundtrip_clips"] == int((labels["kind"] == "clip").sum()) > 0
    assert result["train_captions_prompts"] == 3
    # the last stage of the micro profile, as the evaluate stage picks it
    assert result["model"] == "models/diffusion/stage3/final"
    rates = [
        f"{kind}_{a}"
        for kind in ("roundtrip_same", "roundtrip_label", "train_captions")
        for a in ("color", "motion")
    ]
    assert all(0.0 <= result[k] <= 1.0 for k in rates), result
    # a rate is a count over the clips or prompts, not a smoothed number
    assert all(round(result[k] * result["roundtrip_clips"], 6) % 1 == 0 for k in rates if "roundtrip" in k)
    assert all(round(result[k] * 3, 6) % 1 == 0 for k in rates if "train_captions" in k)
    metrics = json.loads((project.root / "metrics" / "eval.json").read_text())
    assert f"motion {metrics['adherence_motion']:.3f}" in proc.stdout


def test_motion_diagnostics_without_a_model_says_what_to_run(project, tmp_path) -> None:
    proc = project.python("benchmarks/motion_diagnostics.py", "--raw", str(tmp_path / "none"), check=False)
    assert proc.returncode != 0
    assert "make run" in proc.stderr
