"""benchmarks/train_step.py at the tiny size on CPU, full and LoRA, so that the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--size", "tiny", "--img-tokens", "64", "--txt-tokens", "8", "--batch", "1", "--dtype", "fp32"]
TINY += ["--steps", "1", "--warmup", "1", "--device", "cpu", "--plugin", "none"]


def run(tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/train_step.py"), *TINY, "--json", str(out), *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done, json.loads(out.read_text()) if out.exists() else {}


@pytest.mark.bench
def test_train_step_full_and_lora_rows(tmp_path: Path) -> None:
    full_run, full = run(tmp_path, "full")
    assert full_run.returncode == 0, full_run.stderr[-2000:]
    assert full["trainable_params"] == full["params"] > 0 and full["lora_rank"] == 0
    lora_run, lora = run(tmp_path, "lora", "--lora", "--lora-rank", "2")
    assert lora_run.returncode == 0, lora_run.stderr[-2000:]
    assert lora["lora_rank"] == 2 and "+LoRA r2" in lora_run.stdout
    # only the adapters train: a few percent of the parameters, and fewer FLOPs (no base weight grads)
    assert 0 < lora["trainable_params"] <= 0.05 * lora["params"]
    assert lora["params"] > full["params"] and lora["flops_per_step"] < full["flops_per_step"]


def test_train_step_rejects_rank_0(tmp_path: Path) -> None:
    done, result = run(tmp_path, "bad", "--lora", "--lora-rank", "0")
    assert done.returncode == 2 and "--lora-rank must be >= 1" in done.stderr and not result
