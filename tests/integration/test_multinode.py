"""Two torchrun nodes on loopback (c10d rendezvous, one gloo process each) train like one node.

Each "node" is a separate stage CLI (``python -m tasks.vae_train`` or ``tasks.diffusion_train``)
with ``launch.nnodes=2``, its own ``launch.node_rank`` and a shared ``launch.rdzv_endpoint``, so
two real torchrun agents meet in a real rendezvous, as on two hosts sharing the project folder.
"""

from __future__ import annotations

import csv
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.integration.conftest import Project, free_port, make_project_copy, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VAE = ["-m", "tasks.vae_train"]
DIFFUSION = ["-m", "tasks.diffusion_train", "--stage", "stage1"]


@pytest.fixture(scope="module")
def mn_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    project = make_project_copy(tmp_path_factory.mktemp("multinode") / "repo")
    project.dvc("repro", "shard")
    return project


def node_args(port: int, rank: int, *extra: str) -> list[str]:
    return [
        "--set", "launch.nnodes=2",
        "--set", f"launch.rdzv_endpoint=127.0.0.1:{port}",
        "--set", f"launch.node_rank={rank}",
        *extra,
    ]  # fmt: skip


def start_node(project: Project, stage: list[str], port: int, rank: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *stage, *node_args(port, rank, *extra)],
        cwd=project.root,
        env=project.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_two_nodes(project: Project, stage: list[str], *extra: str, timeout: float = 300) -> list[str]:
    """Both nodes of one job, started together; returns each node's output (both must exit 0)."""
    port = free_port()
    nodes = [start_node(project, stage, port, rank, *extra) for rank in (0, 1)]
    outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}\n{out[-4000:]}"
    return outputs


def loss_curve(path: Path) -> list[tuple[float, float]]:
    with path.open() as fh:
        return [(float(row["step"]), float(row["loss"])) for row in csv.DictReader(fh)]


def assert_same_curve(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-7), step


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert (wa[key] - wb[key]).abs().max().item() <= 1e-5 + 1e-5 * wa[key].abs().max().item(), key


@pytest.fixture(scope="module")
def vae_reference(mn_project: Project, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One node with two processes: the loss curve and final weights two nodes must reproduce."""
    root = mn_project.root
    mn_project.python(*VAE, "--set", "launch.nproc_per_node=2")
    keep = tmp_path_factory.mktemp("vae_reference")
    shutil.copy(root / "models/vae/final/model.safetensors", keep / "model.safetensors")
    curve = loss_curve(root / "metrics/vae_train_loss.csv")
    assert len(curve) >= 3
    return {"curve": curve, "weights": keep / "model.safetensors"}


def test_vae_two_nodes_equal_one_node_with_two_processes(mn_project: Project, vae_reference: dict) -> None:
    root = mn_project.root
    shutil.rmtree(root / "models/vae")
    outputs = run_two_nodes(mn_project, VAE)
    assert "--rdzv-backend c10d" in outputs[0] and "is_host=1" in outputs[0] and "is_host=0" in outputs[1]
    assert_same_curve(loss_curve(root / "metrics/vae_train_loss.csv"), vae_reference["curve"])
    assert_same_weights(root / "models/vae/final/model.safetensors", vae_reference["weights"])


def test_diffusion_two_nodes_equal_one_node_with_two_processes(mn_project: Project) -> None:
    root = mn_project.root
    if not (root / "models/vae/final").exists():
        mn_project.python(*VAE)
    mn_project.python("-m", "tasks.vae_stats")
    mn_project.python(*DIFFUSION, "--set", "launch.nproc_per_node=2")
    final = root / "models/diffusion/stage1/final"
    reference = loss_curve(root / "metrics/diffusion_stage1_loss.csv")
    shutil.copy(final / "model.safetensors", root / "reference_stage1.safetensors")
    shutil.rmtree(root / "models/diffusion/stage1")
    run_two_nodes(mn_project, DIFFUSION)
    assert len(reference) >= 2
    assert_same_curve(loss_curve(root / "metrics/diffusion_stage1_loss.csv"), reference)
    assert_same_weights(final / "model.safetensors", root / "reference_stage1.safetensors")


def worker_pids(root: Path, job: str, node_rank: int) -> list[int]:
    """The training workers (not their torchrun agent) of one node of the job in ``root``."""
    pids = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if (
            job in cmd
            and f"launch.node_rank={node_rank}" in cmd
            and "torch.distributed.run" not in cmd
            and proc.info["cwd"] == str(root)
        ):
            pids.append(proc.pid)
    return pids


def test_a_killed_worker_is_restarted_and_training_resumes(mn_project: Project, vae_reference: dict) -> None:
    root = mn_project.root
    shutil.rmtree(root / "models/vae", ignore_errors=True)
    port = free_port()
    extra = ("--set", "launch.max_restarts=1")
    nodes = [start_node(mn_project, VAE, port, rank, *extra) for rank in (0, 1)]
    first_ckpt = root / "models/vae/ckpt/step-00000006/COMPLETE"
    wait_until(first_ckpt.is_file, 240, "the step-6 checkpoint", nodes[1])
    victims = worker_pids(root, "opensora_core.jobs.train_vae", node_rank=1)
    assert len(victims) == 1
    psutil.Process(victims[0]).send_signal(signal.SIGKILL)
    killed = time.monotonic()
    # Before each rendezvous round had its own worker store, the new round's workers hung in
    # gloo's connect on the dead round's keys until the process-group timeout (600 s).
    outputs = [node.communicate(timeout=150)[0] for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}\n{out[-4000:]}"
    assert time.monotonic() - killed < 100
    both = "\n".join(outputs)
    assert "resumed from models/vae/ckpt/step-00000006" in both, both[-4000:]
    # The new round's workers met in a store of their own, not at the dead round's addresses.
    assert "connectFullMesh failed" not in both, both[-4000:]
    assert not worker_pids(root, "opensora_core.jobs.train_vae", node_rank=1)
    # The restarted group continues the step count and ends where the uninterrupted run did.
    assert_same_curve(loss_curve(root / "metrics/vae_train_loss.csv"), vae_reference["curve"])
    assert_same_weights(root / "models/vae/final/model.safetensors", vae_reference["weights"])


def test_a_node_that_never_joins_fails_retryably_naming_the_endpoint(mn_project: Project) -> None:
    port = free_port()
    start = time.monotonic()
    node = start_node(mn_project, VAE, port, 0, "--set", "launch.rdzv_timeout_s=8")
    out = node.communicate(timeout=120)[0]
    elapsed = time.monotonic() - start
    assert node.returncode == 75, out[-3000:]
    assert f"at 127.0.0.1:{port} failed: not all 2 nodes joined within 8s" in out
    assert elapsed < 8 + 45  # the join timeout plus interpreter and torchrun start-up


# --------------------------------------------------------------------------------------------
# The flow launches every node; a retry restarts the whole group
# --------------------------------------------------------------------------------------------
@pytest.fixture
def restore_profile(mn_project: Project):
    """The flow writes its overrides into params/ci.yaml (as dvc exp run -S does): put it back."""
    profile = mn_project.root / "params/ci.yaml"
    text = profile.read_text()
    yield
    profile.write_text(text)


def flow_command(port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "flows.pipeline", "--target", "vae_train",
        "--set", "launch.nnodes=2",
        "--set", f"launch.rdzv_endpoint=127.0.0.1:{port}",
        "--set", "flow.retries=1",
        "--set", "flow.retry_delay_s=1",
        *extra,
    ]  # fmt: skip


def test_flow_launches_both_nodes_and_a_retry_restarts_the_group(
    mn_project: Project, vae_reference: dict, restore_profile: None
) -> None:
    root = mn_project.root
    shutil.rmtree(root / "models/vae", ignore_errors=True)
    flow = subprocess.Popen(
        flow_command(free_port()),
        cwd=root,
        env=mn_project.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Kill node 1's worker once a checkpoint exists: with no torchrun restarts (max_restarts 0)
    # the whole job fails with 75 and only the flow's retry can bring both nodes back.
    first_ckpt = root / "models/vae/ckpt/step-00000006/COMPLETE"
    wait_until(first_ckpt.is_file, 300, "the step-6 checkpoint", flow)
    victims = worker_pids(root, "opensora_core.jobs.train_vae", node_rank=1)
    assert len(victims) == 1
    psutil.Process(victims[0]).send_signal(signal.SIGKILL)
    out = flow.communicate(timeout=400)[0]
    assert flow.returncode == 0, out[-5000:]
    assert "failed with exit code 75 (retryable)" in out and "Retry 1/1 will start" in out, out[-5000:]
    starts = re.findall(r"\[node 1\] \S+ -m tasks\.vae_train --set launch\.node_rank=1", out)
    assert len(starts) == 2, out[-5000:]  # the flow started node 1 for the first try and for the retry
    assert "resumed from models/vae/ckpt/step-00000006" in out
    assert "vae_train" in (root / "dvc.lock").read_text()
    assert_same_curve(loss_curve(root / "metrics/vae_train_loss.csv"), vae_reference["curve"])
    assert_same_weights(root / "models/vae/final/model.safetensors", vae_reference["weights"])


def test_flow_retries_a_node_that_never_joined(mn_project: Project, restore_profile: None) -> None:
    # node_launcher none: the flow runs node 0 only and nobody starts node 1.
    port = free_port()
    extra = ("--set", "flow.node_launcher=none", "--set", "launch.rdzv_timeout_s=8")
    proc = mn_project.run(*flow_command(port, *extra), check=False, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 75, out[-5000:]
    assert f"at 127.0.0.1:{port} failed: not all 2 nodes joined within 8s" in out
    assert "stage vae_train failed with exit code 75 (retryable)" in out
    assert "Retry 1/1 will start" in out  # Prefect retried it: 75 is retryable
    assert (
        len(re.findall(r"\[vae_train\] Running stage 'vae_train'", out)) == 2
    )  # the first try and the retry
