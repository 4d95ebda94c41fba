"""The resume key: code fingerprints from dvc.yaml deps, the FINISHED rule, stale checkpoints set aside."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opensora_core.training.checkpoint import list_checkpoints, save_checkpoint
from opensora_core.training.run_key import (
    FINISHED,
    code_fingerprint,
    finished_step,
    mark_finished,
    project_root,
    resume_config_hash,
    select_resume,
    set_aside,
    stage_code_deps,
)

DVC_YAML = """
stages:
  train:
    cmd: python -m tasks.train
    deps:
      - data/shards
      - tasks/train.py
      - opensora_core/models
      - opensora_core/config.py
    outs:
      - models/out
"""


def _repo(root: Path) -> Path:
    for rel, text in {
        "dvc.yaml": DVC_YAML,
        "tasks/train.py": "print('train')\n",
        "opensora_core/config.py": "A = 1\n",
        "opensora_core/models/net.py": "B = 2\n",
        "opensora_core/models/__pycache__/net.cpython-311.pyc": "compiled",
        "opensora_core/other.py": "C = 3\n",
        "data/shards/manifest.json": "{}",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_code_deps_are_the_stage_deps_under_the_code_folders(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    assert stage_code_deps("train", root) == [
        "tasks/train.py",
        "opensora_core/models",
        "opensora_core/config.py",
    ]
    files = code_fingerprint("train", root)
    # folders count file by file, __pycache__ aside; data deps and files outside the deps do not count
    assert sorted(files) == ["opensora_core/config.py", "opensora_core/models/net.py", "tasks/train.py"]
    assert stage_code_deps("missing", root) == ["opensora_core", "tasks"]  # unknown stage: all the code
    assert "opensora_core/other.py" in code_fingerprint("missing", root)


def test_a_changed_line_changes_the_key_and_the_diff_names_the_file(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    before = {"train": {"lr": 1e-3}, "code": code_fingerprint("train", root)}
    (root / "opensora_core/models/net.py").write_text("B = 3\n")
    after = {"train": {"lr": 1e-3}, "code": code_fingerprint("train", root)}
    assert resume_config_hash(before) != resume_config_hash(after)
    (root / "opensora_core/other.py").write_text("C = 4\n")  # not a dep of the stage
    assert code_fingerprint("train", root) == after["code"]


def test_the_real_vae_stage_fingerprint_follows_dvc_yaml() -> None:
    files = code_fingerprint("vae_train")
    assert "opensora_core/training/vae_trainer.py" in files and "tasks/vae_train.py" in files
    assert "opensora_core/models/vae/shortcut.py" in files  # a folder dep, file by file
    assert not any(f.startswith(("data/", "models/")) for f in files)
    assert (project_root() / "dvc.yaml").is_file()


def _ckpt(ckpt_dir: Path, step: int, key: str) -> Path:
    model = torch.nn.Linear(2, 2)
    return save_checkpoint(ckpt_dir, step, model=model, config={"k": key}, config_hash=key)


def test_a_finished_run_of_the_same_key_trains_again_and_old_checkpoints_move_aside(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _ckpt(ckpt, 2, "a" * 64)
    _ckpt(ckpt, 4, "a" * 64)
    # interrupted (no FINISHED): resume the latest
    path, reason = select_resume(ckpt, "a" * 64, {"k": "a" * 64}, (), target_step=4)
    assert path == ckpt / "step-00000004" and "resuming" in reason
    mark_finished(ckpt, "a" * 64, 4)
    assert finished_step(ckpt, "a" * 64) == 4 and finished_step(ckpt, "b" * 64) is None
    # a longer run continues the finished one
    path, _ = select_resume(ckpt, "a" * 64, {"k": "a" * 64}, (), target_step=6)
    assert path == ckpt / "step-00000004"
    # the same length again (dvc repro --force): from step 0, the old run set aside
    path, reason = select_resume(ckpt, "a" * 64, {"k": "a" * 64}, (), target_step=4)
    assert path is None and "already finished at step 4" in reason and "stale-aaaaaaaaaaaa" in reason
    assert list_checkpoints(ckpt) == [] and not (ckpt / FINISHED).exists()
    stale = ckpt / "stale-aaaaaaaaaaaa"
    assert sorted(p.name for p in stale.iterdir()) == [FINISHED, "step-00000002", "step-00000004"]


def test_another_key_starts_fresh_and_only_one_stale_run_is_kept(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _ckpt(ckpt, 2, "a" * 64)
    path, reason = select_resume(ckpt, "b" * 64, {"k": "b" * 64}, (), target_step=4)
    assert path is None and "differs" in reason
    assert (ckpt / "stale-aaaaaaaaaaaa/step-00000002/COMPLETE").is_file()
    _ckpt(ckpt, 2, "b" * 64)
    path, _ = select_resume(ckpt, "c" * 64, {"k": "c" * 64}, (), target_step=4)
    assert path is None
    assert sorted(p.name for p in ckpt.iterdir()) == ["stale-bbbbbbbbbbbb"]  # the older stale run is gone
    assert set_aside(tmp_path / "nothing") is None


def test_finished_marker_is_json_with_key_and_step(tmp_path: Path) -> None:
    mark_finished(tmp_path, "k", 7)
    assert json.loads((tmp_path / FINISHED).read_text()) == {"config_hash": "k", "step": 7}
