"""The bad-parameter matrix: every stage CLI, every kind of bad parameter, exit 2 naming the key.

Unknown key, wrong type, out-of-range value and a missing profile, each given with ``--set`` to
each CLI's real ``main()`` in a scratch folder holding a copy of params.yaml and params/. The
CLI must exit 2, name the key on stderr with no traceback, and write nothing (the folder's files
are the same before and after). These fail while the configuration loads, before any work.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# CLI module -> (arguments it requires, one of its own keys: unknown, wrong type, out of range).
STAGES: dict[str, tuple[list[str], tuple[str, str], tuple[str, str], tuple[str, str]]] = {
    "ingest": (
        [],
        ("ingest.num_clipz=3", "ingest.num_clipz"),
        ("ingest.num_clips=many", "ingest.num_clips"),
        ("ingest.val_fraction=1.5", "ingest.val_fraction"),
    ),
    "meta": (
        ["--input", "index.csv", "--output", "meta.parquet"],
        ("meta.num_workerz=1", "meta.num_workerz"),
        ("meta.num_workers=two", "meta.num_workers"),
        ("meta.num_workers=-1", "meta.num_workers"),
    ),
    "validate": (
        [],
        ("validate.max_bad=0.1", "validate.max_bad"),
        ("validate.max_bad_fraction=lots", "validate.max_bad_fraction"),
        ("validate.max_bad_fraction=2", "validate.max_bad_fraction"),
    ),
    "shard": (
        [],
        ("shard.rows=4", "shard.rows"),
        ("shard.rows_per_shard=[4]", "shard.rows_per_shard"),
        ("shard.rows_per_shard=0", "shard.rows_per_shard"),
    ),
    "vae_train": (
        [],
        ("vae_train.stepz=3", "vae_train.stepz"),
        ("vae_train.steps=many", "vae_train.steps"),
        ("vae_train.steps=-1", "vae_train.steps"),
    ),
    "vae_stats": (
        [],
        ("vae_stats.samples=3", "vae_stats.samples"),
        ("vae_stats.num_samples=all", "vae_stats.num_samples"),
        ("vae_stats.num_samples=0", "vae_stats.num_samples"),
    ),
    "diffusion_train": (
        ["--stage", "stage1"],
        ("diffusion.stages.stage1.stepz=3", "diffusion.stages.stage1.stepz"),
        ("diffusion.stages.stage1.steps=many", "diffusion.stages.stage1.steps"),
        ("diffusion.stages.stage1.lr=-1", "diffusion.stages.stage1"),
    ),
    "evaluate": (
        [],
        ("evaluate.num_stepz=3", "evaluate.num_stepz"),
        ("evaluate.num_steps=few", "evaluate.num_steps"),
        ("evaluate.num_steps=0", "evaluate.num_steps"),
    ),
    "register": (
        [],
        ("register.gatez=1", "register.gatez"),
        ("register.gate=12", "register.gate"),
        ("register.gate={vae_psnr: .inf}", "register.gate.vae_psnr"),
    ),
    "sample": (
        ["--prompt", "a red circle", "--save-dir", "out"],
        ("launch.nprocs=1", "launch.nprocs"),
        ("launch.nproc_per_node=one", "launch.nproc_per_node"),
        ("launch.nproc_per_node=0", "launch.nproc_per_node"),
    ),
    "vae_reconstruct": (
        ["--input", "clip.mp4", "--save-dir", "out"],
        ("vae_train.familly=wan", "vae_train.familly"),
        ("vae_train.shortcut=maybe", "vae_train.shortcut"),
        ("vae_train.family=vq", "vae_train.family"),
    ),
}
KINDS = ("unknown key", "wrong type", "out of range", "missing profile")
CASES = [(stage, kind) for stage in STAGES for kind in KINDS]


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("params")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copytree(ROOT / "params", root / "params")
    return root


@pytest.mark.parametrize(("stage", "kind"), CASES, ids=[f"{s}-{k.replace(' ', '_')}" for s, k in CASES])
def test_bad_parameter_exits_2_naming_the_key(
    scratch: Path, monkeypatch, capsys, stage: str, kind: str
) -> None:
    required, *bad = STAGES[stage]
    override, key = dict(zip(KINDS, [*bad, ("profile=nope.yaml", "profile 'nope.yaml'")]))[kind]
    monkeypatch.chdir(scratch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{scratch / 'mlflow.db'}")
    before = files_under(scratch)
    main = importlib.import_module(f"tasks.{stage}").main
    code = main([*required, "-q", "--set", override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert key in err and "Traceback" not in err, err
    assert files_under(scratch) == before
