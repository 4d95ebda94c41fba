"""The launcher with real torchrun on CPU (gloo), and its pure parts: command, exit-code resolution."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import psutil
import pytest

from opensora_core.config import LaunchConfig
from opensora_core.distributed.launcher import (
    JobStatus,
    build_job_env,
    build_torchrun_command,
    parse_root_cause,
    rendezvous_failure,
    resolve_exit_code,
    run_job,
)
from opensora_core.errors import ConfigError, GateFailed, NonFiniteLoss
from opensora_core.jobs.common import exit_code_for, run_job_fn

TOY_JOB = "tests.unit.distributed._toy_job"
ROOT = Path(__file__).resolve().parents[3]


def _run_toy(mode: str, out: Path, nproc: int, **kwargs) -> int:
    launch = LaunchConfig(nproc_per_node=nproc, omp_num_threads=1)
    return run_job(TOY_JOB, [mode, str(out)], launch, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT, **kwargs)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------------------------
# Command and environment
# --------------------------------------------------------------------------------------------
def test_command_single_node_binds_loopback():
    cmd = build_torchrun_command(LaunchConfig(nproc_per_node=4), "opensora_core.jobs.vae_train", ["--x", "1"])
    assert cmd[:6] == [
        sys.executable,
        "-m",
        "opensora_core.distributed.bound_store",
        "--bind",
        "127.0.0.1",
        "torch.distributed.run",
    ]
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "127.0.0.1:0"
    assert cmd[cmd.index("--local-addr") + 1] == "127.0.0.1"
    assert "--standalone" not in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[-4:] == ["-m", "opensora_core.jobs.vae_train", "--x", "1"]
    # told otherwise: torch's own standalone mode, every interface
    plain = build_torchrun_command(LaunchConfig(store_bind=""), "m", [])
    assert plain[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in plain
    v6 = build_torchrun_command(LaunchConfig(store_bind="::1"), "m", [])
    assert v6[v6.index("--rdzv-endpoint") + 1] == "[::1]:0"


def test_command_multi_node_rendezvous_and_static():
    c10d = build_torchrun_command(LaunchConfig(nnodes=2, rdzv_endpoint="head:29400", rdzv_id="run7"), "m", [])
    assert "--standalone" not in c10d
    assert c10d[c10d.index("--rdzv-backend") + 1] == "c10d"
    assert c10d[c10d.index("--rdzv-endpoint") + 1] == "head:29400"
    assert c10d[c10d.index("--rdzv-id") + 1] == "run7"
    assert c10d[c10d.index("--nnodes") + 1] == "2"
    # the agent wrapper (a fresh worker store per rendezvous round), no bind: reachable by other nodes
    assert c10d[2:4] == ["opensora_core.distributed.bound_store", "torch.distributed.run"]
    assert "--local-addr" not in c10d and "--bind" not in c10d
    loop = build_torchrun_command(LaunchConfig(rdzv_endpoint="127.0.0.1:29400"), "m", [])
    assert loop[2:6] == [
        "opensora_core.distributed.bound_store",
        "--bind",
        "127.0.0.1",
        "torch.distributed.run",
    ]
    assert c10d[c10d.index("--rdzv-conf") + 1] == "join_timeout=600"  # torchrun guesses the host

    static = build_torchrun_command(
        LaunchConfig(nnodes=2, rdzv_endpoint="10.0.0.1:29500", node_rank=1, rdzv_backend="static"), "m", []
    )
    assert static[static.index("--node-rank") + 1] == "1"
    assert static[static.index("--master-addr") + 1] == "10.0.0.1"
    assert static[static.index("--master-port") + 1] == "29500"
    with pytest.raises(ConfigError, match="host:port"):
        build_torchrun_command(LaunchConfig(rdzv_endpoint="nohostport", node_rank=0), "m", [])


def test_command_c10d_node_rank_picks_the_store_host_and_restarts():
    def conf(rank: int) -> str:
        launch = LaunchConfig(
            nnodes=2, rdzv_endpoint="127.0.0.1:29400", node_rank=rank, rdzv_timeout_s=30, max_restarts=2
        )
        cmd = build_torchrun_command(launch, "m", [])
        assert cmd[cmd.index("--max-restarts") + 1] == "2"
        return cmd[cmd.index("--rdzv-conf") + 1]

    assert conf(0) == "join_timeout=30,is_host=1"
    assert conf(1) == "join_timeout=30,is_host=0"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rdzv_backend": "etcd"}, "rdzv_backend"),
        ({"rdzv_timeout_s": 0}, "rdzv_timeout_s"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"nnodes": 2, "rdzv_endpoint": "h:1", "node_rank": 2}, "node_rank"),
        ({"nnodes": 2, "rdzv_endpoint": "h:1", "rdzv_backend": "static"}, "node_rank >= 0"),
        (
            {
                "nnodes": 2,
                "rdzv_endpoint": "h:1",
                "rdzv_backend": "static",
                "node_rank": 0,
                "max_restarts": 1,
            },
            "c10d",
        ),
    ],
)
def test_launch_config_rejects_bad_multi_node_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LaunchConfig(**kwargs)


def test_job_env_puts_interpreter_bin_first_and_sets_threads(tmp_path):
    env = build_job_env(LaunchConfig(omp_num_threads=3), tmp_path, {"EXTRA": "1"})
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["OPENSORA_JOB_STATUS_DIR"] == str(tmp_path)
    assert env["EXTRA"] == "1"


# --------------------------------------------------------------------------------------------
# Exit-code resolution
# --------------------------------------------------------------------------------------------
def test_resolve_exit_code_prefers_the_earliest_failure():
    statuses = [
        JobStatus(rank=0, exit_code=75, message="Connection closed by peer", error="RuntimeError", time=2.0),
        JobStatus(rank=1, exit_code=5, message="loss is nan", error="NonFiniteLoss", time=1.0),
    ]
    code, reason = resolve_exit_code(1, statuses)
    assert code == 5 and "rank 1" in reason and "loss is nan" in reason
    assert resolve_exit_code(0, statuses)[0] == 0


def test_resolve_exit_code_without_status_uses_torchrun_report():
    report = "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : {code} (pid: 9)\n"
    assert parse_root_cause(report.format(code=-9)) == (1, -9)
    assert resolve_exit_code(1, [], report.format(code=-9))[0] == 75
    assert resolve_exit_code(1, [], report.format(code=2))[0] == 2  # died before the job wrapper ran
    assert resolve_exit_code(1, [], "RendezvousTimeoutError")[0] == 75


def test_resolve_exit_code_reads_the_last_restart_round_only():
    statuses = [
        JobStatus(rank=0, exit_code=5, message="loss is nan", time=1.0, restart=0),
        JobStatus(rank=1, exit_code=75, message="Connection closed by peer", time=9.0, restart=1),
    ]
    code, reason = resolve_exit_code(1, statuses)
    assert code == 75 and "rank 1" in reason


def test_rendezvous_failure_names_the_endpoint():
    launch = LaunchConfig(nnodes=2, rdzv_endpoint="127.0.0.1:29411", rdzv_id="job9", rdzv_timeout_s=8)
    stderr = "Traceback ...\ntorch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\n"
    reason = rendezvous_failure(launch, stderr)
    assert reason is not None
    assert "'job9' at 127.0.0.1:29411" in reason and "not all 2 nodes joined within 8s" in reason
    assert rendezvous_failure(launch, "RuntimeError: shape mismatch") is None
    assert rendezvous_failure(LaunchConfig(), stderr) is None  # standalone: no endpoint to name


def test_job_wrapper_maps_exceptions_to_exit_codes():
    import torch
    import torch.distributed as tdist

    assert exit_code_for(ConfigError("bad key")) == 2
    assert exit_code_for(GateFailed("psnr too low")) == 3
    assert exit_code_for(torch.OutOfMemoryError("CUDA out of memory")) == 4
    assert exit_code_for(NonFiniteLoss("nan")) == 5
    assert exit_code_for(tdist.DistBackendError("NCCL watchdog timeout")) == 75
    assert exit_code_for(tdist.DistStoreError("rendezvous store timeout")) == 75
    assert exit_code_for(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1")) == 75
    assert exit_code_for(RuntimeError("shape mismatch")) == 1
    assert exit_code_for(SystemExit(0)) == 0


def test_job_wrapper_writes_the_status_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENSORA_JOB_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "3")

    def job() -> None:
        raise NonFiniteLoss("loss is inf at step 12")

    assert run_job_fn(job, name="toy") == 5
    status = json.loads((tmp_path / "rank-00003.json").read_text())
    assert status["exit_code"] == 5 and status["rank"] == 3
    assert status["error"] == "NonFiniteLoss" and "step 12" in status["message"]
    assert "toy [rank 3]: error (exit 5): NonFiniteLoss: loss is inf at step 12" in capsys.readouterr().err
    assert run_job_fn(lambda: None, name="toy") == 0
    assert json.loads((tmp_path / "rank-00003.json").read_text())["exit_code"] == 0


# --------------------------------------------------------------------------------------------
# Real torchrun
# --------------------------------------------------------------------------------------------
def test_two_process_all_reduce_streams_output(tmp_path, capfd):
    assert _run_toy("allreduce", tmp_path, nproc=2) == 0
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["sum"] for r in results] == [3.0, 3.0]  # (0 + 1) + (1 + 1)
    assert {r["world_size"] for r in results} == {2}
    out = capfd.readouterr().out
    assert "toy job rank 0 of 2: sum 3" in out and "toy job rank 1 of 2: sum 3" in out


def test_first_failing_rank_code_reaches_the_launcher(tmp_path, capfd):
    # Rank 1 raises NonFiniteLoss; rank 0 then fails in its barrier (a retryable gloo error) or
    # is stopped by torchrun: the launcher must report the cause, 5.
    assert _run_toy("nonfinite_rank1", tmp_path, nproc=2) == 5
    assert "NonFiniteLoss: loss is nan at step 3" in capfd.readouterr().err


def test_config_error_maps_to_2(tmp_path):
    assert _run_toy("config_error", tmp_path, nproc=1) == 2


def test_worker_killed_by_sigkill_is_retryable(tmp_path):
    assert _run_toy("sigkill", tmp_path, nproc=1) == 75


def test_timeout_kills_the_whole_process_tree(tmp_path):
    # Workers run in sessions of their own; rank 1 ignores SIGTERM and rank 0 has a child process.
    start = time.monotonic()
    code = _run_toy("hang", tmp_path, nproc=2, timeout_s=12, grace_s=1.0)
    elapsed = time.monotonic() - start
    assert code == 75
    assert elapsed < 12 + 1.0 + 10
    pids = [pid for f in sorted(tmp_path.glob("pids-*.json")) for pid in json.loads(f.read_text())]
    assert len(pids) == 3, "both workers and rank 0's child should have started before the timeout"
    assert not [pid for pid in pids if _alive(pid)]
    # Nothing that was started for this job (torchrun, workers, child) is left running.
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or []) and _alive(p.pid)
    ]
    assert leftovers == []


def _listening(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state held by ``pids`` (from /proc/net)."""
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        out += [(c.laddr.ip, c.laddr.port, pid) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


@pytest.mark.parametrize(("store_bind", "loopback_only"), [("127.0.0.1", True), ("", False)])
def test_real_torchrun_listens_on_loopback_only(tmp_path, store_bind: str, loopback_only: bool):
    """A real two-worker job: every listening socket of torchrun and its workers is on 127.0.0.1.

    The control case (``store_bind: ""``, torch's ``--standalone``) shows the check sees a store
    listening on every interface.
    """
    import threading

    launch = LaunchConfig(nproc_per_node=2, omp_num_threads=1, store_bind=store_bind, kill_grace_s=1.0)
    codes: list[int] = []
    env = {"PYTHONPATH": str(ROOT)}
    job = threading.Thread(
        target=lambda: codes.append(run_job(TOY_JOB, ["hang", str(tmp_path)], launch, 120, env, cwd=ROOT))
    )
    job.start()
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("pids-*.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [json.loads(f.read_text())[0] for f in sorted(tmp_path.glob("pids-*.json"))]
        assert len(workers) == 2, "both workers should have joined the rendezvous"
        agent = psutil.Process(workers[0]).parent()
        assert "torch.distributed.run" in " ".join(agent.cmdline())
        tree = [agent.pid, *(p.pid for p in agent.children(recursive=True))]
        sockets = _listening(tree)
        assert any(pid == agent.pid for _, _, pid in sockets), f"the agent's store should listen: {sockets}"
        wildcard = [s for s in sockets if s[0] not in ("127.0.0.1", "::1")]
        assert (wildcard == []) is loopback_only, sockets
    finally:
        for f in tmp_path.glob("pids-*.json"):
            for pid in json.loads(f.read_text()):
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
        job.join(timeout=60)
    assert codes == [75]  # killed workers: retryable, the job is gone
