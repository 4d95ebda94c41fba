"""A LoRA stage under real torchrun killed with SIGKILL mid-run resumes to the same adapter as a
run that was never interrupted (ColossalAI ddp plugin, gloo, one CPU process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from opensora_core.models.mmdit import build_mmdit
from opensora_core.training.checkpoint import list_checkpoints
from tests.unit.training._diffusion_data import BUCKETS, DiffusionInputs, make_diffusion_inputs

ROOT = Path(__file__).resolve().parents[3]
STEPS, CKPT_EVERY = 24, 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> DiffusionInputs:
    return make_diffusion_inputs(tmp_path_factory.mktemp("lora-torchrun"))


def write_params(inputs: DiffusionInputs, tmp: Path) -> Path:
    torch.manual_seed(5)
    base = build_mmdit("tiny")
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.02)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp / "base.safetensors"))
    stage = {
        "steps": STEPS,
        "lr": 1e-3,
        "warmup_steps": 2,
        "buckets": BUCKETS,
        "conditions": {"weights": {"t2v": 1.0}},
        "lora": {"enabled": True, "rank": 2, "alpha": 4.0},
    }
    params = {
        "launch": {"omp_num_threads": 1},
        "tracking": {"enabled": False},
        "diffusion": {
            "init_from": str(tmp / "base.safetensors"),
            "cache_dir": str(tmp / "cache"),
            "log_every": 1,
            "ckpt_every": CKPT_EVERY,
            "num_samples": 1,
            "sample_num_steps": 1,
            "stages": {"stage1": stage},
        },
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def path_args(inputs: DiffusionInputs, params: Path, out: Path) -> list[str]:
    p = inputs.paths
    return [
        "--stage", "stage1", "--params", str(params), "--shards", str(p.shards), "--vae", str(p.vae),
        "--latent-stats", str(p.latent_stats), "--models-dir", str(out / "models"),
        "--metrics-dir", str(out / "metrics"), "--quiet",
    ]  # fmt: skip


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}


def run_stage(inputs: DiffusionInputs, params: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tasks.diffusion_train", *path_args(inputs, params, out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "models" / "stage1" / "final" / "adapter" / "adapter.safetensors"))


def test_sigkilled_lora_run_resumes_to_the_same_adapter(inputs: DiffusionInputs, tmp_path: Path) -> None:
    params = write_params(inputs, tmp_path)
    run_stage(inputs, params, tmp_path / "whole")

    # 1. torchrun itself, in its own process group, SIGKILLed once a checkpoint is on disk
    broken = tmp_path / "broken"
    ckpt = broken / "models" / "stage1" / "ckpt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "-m", "opensora_core.jobs.train_diffusion", *path_args(inputs, params, broken),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not list_checkpoints(ckpt) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done = list_checkpoints(ckpt)
    assert done and proc.returncode == -signal.SIGKILL, "the run was not killed mid-way"
    assert not (broken / "models" / "stage1" / "final").exists()
    killed_at = int(done[-1].name.split("-")[1])
    assert killed_at < STEPS
    # only the adapter was checkpointed: model.pt holds LoRA tensors alone
    saved = torch.load(done[-1] / "model.pt", weights_only=True)
    assert saved and all(".lora_" in k for k in saved)

    # 2. the stage CLI resumes it and ends where the uninterrupted run ended
    resumed = run_stage(inputs, params, broken)
    assert "resum" in (resumed.stdout + resumed.stderr).lower()
    a, b = adapter(tmp_path / "whole"), adapter(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("ema.safetensors", "model.safetensors"):
        x = load_file(str(tmp_path / "whole" / "models" / "stage1" / "final" / name))
        y = load_file(str(broken / "models" / "stage1" / "final" / name))
        assert all(torch.equal(x[k], y[k]) for k in x), name
