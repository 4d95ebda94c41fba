"""benchmarks/gpu_suite.py on CPU at ``--tiny`` sizes: prepare a bundle, then run every part through
benchmarks/gpu_suite.sh with av, mlflow, prefect, dvc and great_expectations unimportable, as on the
GPU machine (a sitecustomize on PYTHONPATH blocks them in every process, torchrun's workers too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.bench, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("av", "mlflow", "prefect", "dvc", "great_expectations")
SITECUSTOMIZE = f"""
import sys

# Every finder answers "not installed" (None) for the blocked names, as on a machine without them:
# an import fails with ModuleNotFoundError and importlib.util.find_spec returns None.
class _NotOnTheGpuMachine:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [_NotOnTheGpuMachine(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


def suite_env(blocker: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return env | extra


@pytest.fixture(scope="module")
def blocker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def test_tiny_dry_run_of_every_part_without_av(tmp_path: Path, blocker: Path) -> None:
    # 1. the bundle, prepared with every package at hand
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    prep = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_suite.py"), "prepare", "--tiny", "--out", str(bundle)],
        cwd=ROOT,
        env=suite_env(Path("/nonexistent")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["mode"] == "tiny" and info["cache"]["latents"] == info["clips"] == 4
    assert info["filled_by"]["model"] == "tiny" and info["total_mb"] < 8
    assert (bundle / "params" / "gpu-suite.yaml").is_file() and (bundle / "clips" / "decoded.npz").is_file()

    # 2. the blocker works: av cannot be imported under it
    probe = subprocess.run(
        [sys.executable, "-c", "import av"], env=suite_env(blocker), capture_output=True, text=True
    )
    assert probe.returncode == 1 and "No module named 'av'" in probe.stderr

    # 3. the device command, dry run
    env = suite_env(
        blocker, OUT=str(out), GPU_SUITE_BUNDLE=str(bundle), GPU_SUITE_BUDGET_S="400", PYTHON=sys.executable
    )
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    parts = report["parts"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(
        ("train_step", "resume", "latent", "optimisations"), "ok"
    ), json.dumps(parts, indent=1)[-3000:]

    # (a) four rows with real figures
    rows = parts["train_step"]["rows"]
    assert [r["name"] for r in rows] == ["1B plain", "1B ddp", "reference plain", "reference ddp"]
    assert all(r["status"] == "ok" and r["result"]["tflops"] > 0 for r in rows)
    # (b) every switch ran against its baseline, except the ZeRO-2 ones (CUDA only)
    for row in parts["optimisations"]["rows"]:
        if row["name"].startswith("zero2"):
            assert row["status"] == "skipped" and "needs CUDA" in row["reason"]
        else:
            assert row["status"] == "ok" and row["speedup"] > 0, row
    # (c) the step count continues from the checkpoint and the loss repeats the first run's
    resume = parts["resume"]
    assert resume["first_run_exit"] == 75  # the launcher's code for a killed worker
    assert (resume["resumed_from_step"], resume["final_step"], resume["steps_run_after_resume"]) == (4, 8, 4)
    assert resume["compared_steps"] == [5, 6, 7, 8] and resume["loss_matches"]
    assert resume["loss_max_rel_diff"] <= 1e-5
    # a model of another size read only the latents the tiny one cached: one key, no new entry
    assert resume["model"] == "small" != info["filled_by"]["model"]
    assert resume["cache_key"] == info["cache_key"] and resume["all_latents_cached"]
    assert resume["cache_latents_before"] == resume["cache_latents_after"] == 4
    # (d) the product's caching path and the bare encode give the same latents
    latent = parts["latent"]
    assert latent["max_abs_latent_diff"] < 1e-5 and latent["cache_entries_written"] == 2
    assert latent["product_frames_per_s"] > 0 and latent["bare_frames_per_s"] > 0

    md = (out / "gpu_suite.md").read_text()
    assert "- card: cpu" in md and "## (c) resume" in md and "## (d) latent caching" in md
    assert "| (b) optimisations | ok |" in md


def test_run_rejects_a_missing_bundle(tmp_path: Path, blocker: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/gpu_suite.py"),
            "run",
            "--tiny",
            "--bundle",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        env=suite_env(blocker),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "has no bundle.json" in done.stderr
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/gpu_suite.py"),
            "run",
            "--bundle",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--parts",
            "resume,warp",
        ],
        env=suite_env(blocker),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--parts: unknown warp" in bad.stderr
