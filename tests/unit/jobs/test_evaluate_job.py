"""The evaluate stage as a torchrun job: 1 and 2 ranks (real torchrun, gloo, CPU) write the same results.

Every batch holds the same clips or prompts whatever the world size and rank 0 reduces the
gathered per-batch results in batch order, so the two runs are expected to agree bit for bit:
the metrics to 1e-6 (they are rounded to 6 digits) and the samples' decoded frames exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from opensora_core.data.video_io import read_video
from opensora_core.jobs.evaluate import merge_in_order, pool_val_losses, shard_work
from tasks import evaluate as evaluate_task
from tests.unit.tasks._tiny_t2v import write_eval_project

ROOT = Path(__file__).resolve().parents[3]
# Two val batches, two sample batches (3 prompts, 2 at a time): both ranks get work, unevenly.
SETS = [
    "evaluate.num_steps=2",
    "evaluate.num_prompts=3",
    "evaluate.batch_size=2",
    "evaluate.val_timesteps=[0.3, 0.8]",
    "evaluate.max_val_clips=3",
    "tracking.enabled=false",
    "launch.omp_num_threads=1",
]


def cli(*extra: str) -> int:
    args = ["--params", str(ROOT / "params.yaml"), "--stage", "stage1", "-q"]
    for item in SETS:
        args += ["--set", item]
    return evaluate_task.main([*args, *extra])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_project")
    write_eval_project(root)
    return root


@pytest.mark.slow
def test_one_and_two_ranks_write_the_same_metrics_and_samples(project, monkeypatch, capfd) -> None:
    monkeypatch.chdir(project)  # the stage runs in the project root: shard paths are relative to it
    runs = {}
    for nproc in (1, 2):
        out = f"n{nproc}"
        code = cli(
            "--set",
            f"launch.nproc_per_node={nproc}",
            "--metrics",
            f"metrics/{out}.json",
            "--report-dir",
            f"reports/{out}",
        )
        captured = capfd.readouterr()
        assert code == 0, captured.err[-3000:]
        assert f"evaluate job ({nproc} ranks)" in captured.out
        runs[nproc] = (json.loads((project / f"metrics/{out}.json").read_text()), project / f"reports/{out}")

    (one, one_dir), (two, two_dir) = runs[1], runs[2]
    assert one["num_val_clips"] == 3 and one["num_samples"] == 3
    assert set(one) == set(two)
    for key, value in one.items():
        if isinstance(value, dict):
            assert value.keys() == two[key].keys(), key
            for k, v in value.items():
                assert two[key][k] == pytest.approx(v, abs=1e-6), f"{key}.{k}"
        elif isinstance(value, float):
            assert two[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert two[key] == value, key

    names = sorted(p.name for p in (one_dir / "samples").iterdir())
    assert names == sorted(p.name for p in (two_dir / "samples").iterdir())
    assert len([n for n in names if n.endswith(".mp4")]) == 3
    for name in names:
        if name.endswith(".mp4"):
            a, _ = read_video(one_dir / "samples" / name)
            b, _ = read_video(two_dir / "samples" / name)
            assert a.shape == (9, 32, 32, 3) and np.array_equal(a, b), name
        else:
            assert (one_dir / "samples" / name).read_text() == (two_dir / "samples" / name).read_text()
    pd.testing.assert_frame_equal(
        pd.read_csv(one_dir / "adherence.csv"), pd.read_csv(two_dir / "adherence.csv")
    )
    for name in ("grid.png", "metrics.png", "val_loss_by_t.csv"):
        assert (two_dir / name).is_file(), name


def test_bad_stage_or_inputs_exit_2_before_launching(project, monkeypatch, capsys) -> None:
    def no_launch(*args, **kwargs):
        raise AssertionError("the job was launched")

    monkeypatch.setattr(evaluate_task, "run_job", no_launch)
    monkeypatch.chdir(project)
    assert cli("--stage", "nope") == 2
    assert "'nope' is not a diffusion stage; valid: stage1, stage2, stage3" in capsys.readouterr().err
    assert cli("--shards", "data/nowhere") == 2
    assert "data/nowhere/manifest.json" in capsys.readouterr().err
    assert cli("--model", "data/raw") == 2
    assert "no mmdit_config.json" in capsys.readouterr().err
    assert cli("--latent-stats", "gone.json") == 2
    assert "gone.json" in capsys.readouterr().err


def test_a_failed_job_passes_its_exit_code_on(project, monkeypatch, capsys) -> None:
    monkeypatch.setattr(evaluate_task, "run_job", lambda *args, **kwargs: 5)
    monkeypatch.chdir(project)
    assert cli() == 5
    assert "exit code 5" in capsys.readouterr().err


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_item_goes_to_exactly_one_rank_and_comes_back_in_order(world: int) -> None:
    items = list("abcdefg")
    parts = [[(j, x.upper()) for j, x in shard_work(items, r, world)] for r in range(world)]
    assert sorted(j for part in parts for j, _ in part) == list(range(len(items)))
    assert merge_in_order(parts[::-1]) == [x.upper() for x in items]


def test_pooled_val_loss_is_the_mean_over_clips_whatever_the_batches() -> None:
    losses = torch.arange(1.0, 13.0).reshape(6, 2)  # 6 clips, 2 times
    batches = [("a", losses[:4]), ("b", None), ("b", losses[4:])]
    pooled = pool_val_losses(batches, [0.25, 0.75])
    assert pooled["num_val_clips"] == 6
    assert pooled["val_loss_by_t"] == {"0.25": 6.0, "0.75": 7.0}
    assert pooled["val_loss"] == pytest.approx(6.5)
    assert pooled["val_loss_by_bucket"] == {"a": pytest.approx(4.5), "b": pytest.approx(10.5)}
