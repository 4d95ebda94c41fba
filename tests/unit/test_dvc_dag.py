"""Stage order read from dvc.yaml and the exit-code classification of failed stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.dvc_dag import command_exit_code, is_retryable, stage_order, upstream_of

ROOT = Path(__file__).resolve().parents[2]


def write_dvc(tmp_path: Path, stages: dict) -> Path:
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return tmp_path


def test_order_follows_data_dependencies_not_file_order(tmp_path: Path) -> None:
    root = write_dvc(
        tmp_path,
        {
            "c": {"cmd": "x", "deps": ["data/b/out.txt"], "outs": ["data/c"]},
            "a": {"cmd": "x", "outs": ["data/a"]},
            "b": {"cmd": "x", "deps": ["data/a"], "outs": ["data/b"]},
            "side": {"cmd": "x", "deps": ["README.md"], "outs": ["side.txt"]},
        },
    )
    assert stage_order(root) == ["a", "b", "c", "side"]
    assert upstream_of(root, "c") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unknown stage 'zz'"):
        upstream_of(root, "zz")


def test_cycle_is_reported(tmp_path: Path) -> None:
    root = write_dvc(
        tmp_path,
        {
            "a": {"cmd": "x", "deps": ["b.txt"], "outs": ["a.txt"]},
            "b": {"cmd": "x", "deps": ["a.txt"], "outs": ["b.txt"]},
        },
    )
    with pytest.raises(ValueError, match="cycle"):
        stage_order(root)


def test_repository_dag_starts_with_the_data_stages() -> None:
    assert stage_order(ROOT)[:4] == ["ingest", "meta", "validate", "shard"]


@pytest.mark.parametrize(
    ("output", "code", "retryable"),
    [
        ("ERROR: failed to reproduce 'x': failed to run: python -m tasks.x, exited with 75", 75, True),
        ("ERROR: failed to reproduce 'x': failed to run: python -m tasks.x, exited with -9", -9, True),
        ("ERROR: failed to reproduce 'x': failed to run: python -m tasks.x, exited with 3", 3, False),
        ("ERROR: failed to reproduce 'x': failed to run: python -m tasks.x, exited with 2", 2, False),
        ("ERROR: Unable to acquire lock. Most likely another DVC process is running", 255, True),
    ],
)
def test_exit_code_classification(output: str, code: int, retryable: bool) -> None:
    assert command_exit_code(output, 255) == code
    assert is_retryable(code, output) is retryable
