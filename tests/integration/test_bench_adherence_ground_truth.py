"""``benchmarks/adherence_ground_truth.py``: the adherence scorer on clips whose attributes are known."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow

LINE = re.compile(
    r"^(\S+): (\d+) clips, color ([\d.]+), motion ([\d.]+), shape ([\d.]+) \(shape_fill ([\d.]+)\)$", re.M
)


def test_the_scorer_reads_ground_truth_and_the_vae_round_trip(project, pipeline_run) -> None:
    proc = project.python(
        "benchmarks/adherence_ground_truth.py", "--params", "params.yaml", "--per-combo", "4",
        "--vae", "models/vae/final", "--write",
    )  # fmt: skip
    rows = {m[0]: (int(m[1]), *map(float, m[2:])) for m in LINE.findall(proc.stdout)}
    assert set(rows) == {"rendered", "dataset", "rendered+vae", "dataset+vae"}, proc.stdout
    # the micro profile holds out 3 combinations: 4 rendered clips each
    assert rows["rendered"][0] == rows["rendered+vae"][0] == 12
    assert rows["dataset"][0] == rows["dataset+vae"][0] > 0
    # the scorer's target on real clips: every attribute at least 0.95
    for name in ("rendered", "dataset"):
        assert min(rows[name][1:]) >= 0.95, (name, rows[name])
    # every score is a share of whole clips (printed to 3 decimals)
    for n, *scores in rows.values():
        assert all(abs(s * n - round(s * n)) <= 0.0005 * n + 1e-9 for s in scores), (n, scores)
    assert "| rendered | 12 |" in proc.stdout


def test_a_target_the_scorer_misses_exits_1_and_names_the_set(project, pipeline_run) -> None:
    proc = project.python(
        "benchmarks/adherence_ground_truth.py", "--per-combo", "1", "--min", "1.01", check=False
    )
    assert proc.returncode == 1
    assert "under 1.01 on ground truth" in proc.stderr and "'rendered'" in proc.stderr
