"""Every node's part of a multi-node training stage, launched by the flow as one group.

With ``launch.nnodes > 1`` a training stage is one torchrun job spread over several node
launches that meet at ``launch.rdzv_endpoint``. The flow's stage task runs node 0 through
``dvc repro --single-item STAGE`` (so ``dvc.lock`` records the run) and, with
``flow.node_launcher: local``, starts nodes 1..N-1 itself as the stage's own command from
dvc.yaml plus ``--set launch.node_rank=I``, on this machine, once DVC says the stage runs. The
whole group lives and dies inside one Prefect task: when any node fails, the others are killed
and the task fails with that exit code, so Prefect's retry of a retryable failure (75: a killed
worker, a node that never joined) restarts every node, and training resumes from the latest
checkpoint.

``local`` fits nodes that share one machine (loopback, a test, a fat box split into nodes). On
a cluster, set ``flow.node_launcher: none`` and start the other nodes with the cluster's tool
(README, "Multi-node training": ``srun`` runs the same stage command once per node).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from flows.dvc_dag import read_stages
from opensora_core.config import Config
from opensora_core.process import kill_process_tree

NODE_RANK_KEY = "launch.node_rank"


def node_commands(root: Path, stage: str, cfg: Config) -> list[list[str]]:
    """The commands of nodes 1..nnodes-1 for ``stage``; empty when the flow runs node 0 only.

    Only stages that launch torchrun (those with the ``launch`` section among their DVC params)
    have other nodes; their command is dvc.yaml's ``cmd`` run by this interpreter.
    """
    if cfg.launch.nnodes < 2 or cfg.flow.node_launcher != "local":
        return []
    spec = read_stages(root)[stage]
    if not any(_names_launch(entry) for entry in spec.get("params") or []):
        return []
    argv = shlex.split(spec["cmd"])
    if argv and argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    return [[*argv, "--set", f"{NODE_RANK_KEY}={rank}"] for rank in range(1, cfg.launch.nnodes)]


def _names_launch(entry: object) -> bool:
    if isinstance(entry, str):
        return entry == "launch" or entry.startswith("launch.")
    if isinstance(entry, dict):
        return any(_names_launch(item) for items in entry.values() for item in (items or []))
    return False


class NodeGroup:
    """Nodes 1..N-1 of one stage run: started together, waited for together, killed together."""

    def __init__(
        self,
        commands: list[list[str]],
        *,
        cwd: str | Path,
        env: Mapping[str, str],
        log: Callable[[str], None],
    ) -> None:
        self.commands = commands
        self.cwd = cwd
        self.env = dict(env)
        self.log = log
        self.procs: list[subprocess.Popen] = []
        self._pumps: list[threading.Thread] = []

    @property
    def started(self) -> bool:
        return bool(self.procs)

    def start(self) -> None:
        """Start every node (each in a session of its own), their output prefixed with the node."""
        for rank, cmd in enumerate(self.commands, start=1):
            self.log(f"[node {rank}] {' '.join(cmd)}")
            proc = subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            pump = threading.Thread(target=self._pump, args=(rank, proc), daemon=True)
            pump.start()
            self.procs.append(proc)
            self._pumps.append(pump)

    def _pump(self, rank: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log(f"[node {rank}] {line.rstrip()}")

    def finish(self, node0_ok: bool, wait_s: float = 120.0) -> tuple[int, int]:
        """Wait for the nodes (when node 0 succeeded) or kill them; ``(node, exit code)`` of the first failure.

        torchrun's agents leave together (they wait at an exit barrier), so once node 0 is done
        the others end within seconds; one still running after ``wait_s`` is killed and failed.
        Returns ``(0, 0)`` when every node succeeded.
        """
        failure = (0, 0)
        for rank, proc in enumerate(self.procs, start=1):
            try:
                code = proc.wait(timeout=wait_s if node0_ok else 0.1)
            except subprocess.TimeoutExpired:
                kill_process_tree(proc, grace_s=5.0)
                code = proc.wait()
                code = 75 if node0_ok else code  # still running after node 0 ended: a hung node
            if code != 0 and failure == (0, 0):
                failure = (rank, code)
        for pump in self._pumps:
            pump.join(timeout=10)
        return failure

    def kill(self) -> None:
        """Kill every node still running (the stage task is leaving on an error)."""
        for proc in self.procs:
            if proc.poll() is None:
                kill_process_tree(proc, grace_s=5.0)
