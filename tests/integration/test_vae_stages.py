"""VAE stages on real shards: loss goes down, a killed job resumes exactly, stats on 2 ranks = 1 rank."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import Project, make_project_copy, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The plain architecture: with the latent shortcut (the default) training starts from the blurred
# reconstruction, and 16 steps are too few to show the loss going down
# (tests/unit/models/vae/test_shortcut.py trains that one).
SMALL = [
    "--set", "vae_train.shortcut=false",
    "--set", "vae_train.steps=16",
    "--set", "vae_train.ckpt_every=4",
    "--set", "vae_train.log_every=2",
    "--set", "vae_train.sample_every=0",
    "--set", "vae_train.val_clips=2",
    "--set", "vae_train.buckets={32px: {9: [1.0, 2]}}",
]  # fmt: skip


@pytest.fixture(scope="module")
def vae_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    project = make_project_copy(tmp_path_factory.mktemp("vae") / "repo")
    project.dvc("repro", "shard")
    return project


def loss_rows(path: Path) -> list[dict[str, float]]:
    with path.open() as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def train_worker_pids(root: Path) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if (
            "opensora_core.jobs.train_vae" in cmd
            and "torch.distributed.run" not in cmd
            and proc.info["cwd"] == str(root)
        ):
            pids.append(proc.pid)
    return pids


def test_training_lowers_the_loss_and_resumes_exactly_after_a_kill(vae_project: Project) -> None:
    root = vae_project.root
    # 1. the uninterrupted run
    vae_project.python("-m", "tasks.vae_train", *SMALL)
    reference = loss_rows(root / "metrics/vae_train_loss.csv")
    assert [r["step"] for r in reference] == [float(s) for s in range(2, 17, 2)]
    assert sum(r["l1"] for r in reference[-2:]) < sum(r["l1"] for r in reference[:2])
    metrics = json.loads((root / "metrics/vae.json").read_text())
    assert set(metrics) >= {"psnr", "ssim", "psnr_baseline"}
    assert (root / "metrics/vae_train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.rmtree(root / "models/vae")

    # 2. the same run, its worker killed once the step-4 checkpoint is complete
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.vae_train", *SMALL],
        cwd=root,
        env=vae_project.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(
        lambda: (root / "models/vae/ckpt/step-00000004/COMPLETE").is_file(), 300, "the first checkpoint", proc
    )
    for pid in train_worker_pids(root):
        psutil.Process(pid).send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]  # a killed worker is retryable
    assert not (root / "models/vae/final").exists()

    # 3. the rerun resumes from the latest checkpoint and ends exactly where the first run did
    rerun = vae_project.python("-m", "tasks.vae_train", *SMALL)
    assert "resumed from models/vae/ckpt/step-" in rerun.stdout + rerun.stderr
    resumed = loss_rows(root / "metrics/vae_train_loss.csv")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for a, b in zip(reference, resumed):
        for key in ("loss", "l1", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)


def test_latent_stats_on_two_ranks_equal_one_rank(vae_project: Project) -> None:
    root = vae_project.root
    if not (root / "models/vae/final").exists():
        vae_project.python("-m", "tasks.vae_train", *SMALL)
    outs = {}
    for n in (1, 2):
        out = root / f"stats_{n}.json"
        vae_project.python(
            "-m", "tasks.vae_stats", "--set", f"launch.nproc_per_node={n}", "--output", str(out)
        )
        outs[n] = json.loads(out.read_text())
    one, two = outs[1], outs[2]
    assert one["num_samples"] == two["num_samples"] > 0
    assert one["vae_sha256"] == two["vae_sha256"]
    assert len(one["mean"]) == len(one["std"]) == 8
    assert two["mean"] == pytest.approx(one["mean"], rel=1e-6, abs=1e-7)
    assert two["std"] == pytest.approx(one["std"], rel=1e-6, abs=1e-7)


def test_bad_parameters_exit_2_before_launch(vae_project: Project) -> None:
    start = time.monotonic()
    proc = vae_project.python("-m", "tasks.vae_train", "--set", "vae_train.family=sdxl", check=False)
    assert proc.returncode == 2
    assert "vae_train.family must be wan or hunyuan" in proc.stderr
    assert time.monotonic() - start < 60


def test_vae_reconstruct_cli_tiles_large_inputs(vae_project: Project, tmp_path: Path) -> None:
    import numpy as np

    from opensora_core.data.video_io import write_video

    if not (vae_project.root / "models/vae/final").exists():
        vae_project.python("-m", "tasks.vae_train", *SMALL)
    frames = np.zeros((9, 48, 80, 3), dtype=np.uint8)
    frames[:, 10:30, 20:50] = (200, 40, 40)
    write_video(tmp_path / "big clip.mp4", frames, fps=8)
    proc = vae_project.python(
        "-m", "tasks.vae_reconstruct", "--input", str(tmp_path / "big clip.mp4"),
        "--save-dir", str(tmp_path / "out"), "--tile", "32", "--overlap", "16",
    )  # fmt: skip
    assert "psnr" in proc.stdout and (tmp_path / "out" / "big clip_recon.mp4").is_file()
    missing = vae_project.python(
        "-m",
        "tasks.vae_reconstruct",
        "--input",
        str(tmp_path / "nope.mp4"),
        "--save-dir",
        str(tmp_path),
        check=False,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
