"""flows/nodes.py: which commands the flow starts for nodes 1..N-1, and how the group ends."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from flows.nodes import NodeGroup, node_commands
from opensora_core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
MULTI = ["launch.nnodes=3", "launch.rdzv_endpoint=127.0.0.1:29400"]


def test_training_stages_get_one_command_per_other_node():
    cfg = load_config(ROOT / "params.yaml", MULTI)
    cmds = node_commands(ROOT, "diffusion_stage1", cfg)
    assert cmds == [
        [sys.executable, "-m", "tasks.diffusion_train", "--stage", "stage1", "--set", f"launch.node_rank={r}"]
        for r in (1, 2)
    ]
    assert len(node_commands(ROOT, "vae_train", cfg)) == 2


def test_no_other_nodes_for_data_stages_single_node_or_an_outside_launcher():
    assert node_commands(ROOT, "shard", load_config(ROOT / "params.yaml", MULTI)) == []
    assert node_commands(ROOT, "vae_train", load_config(ROOT / "params.yaml")) == []
    outside = load_config(ROOT / "params.yaml", [*MULTI, "flow.node_launcher=none"])
    assert node_commands(ROOT, "vae_train", outside) == []


def test_bad_node_launcher_is_rejected():
    from opensora_core.errors import ConfigError

    with pytest.raises(ConfigError, match="node_launcher"):
        load_config(ROOT / "params.yaml", ["flow.node_launcher=ssh"])


def _group(*codes_and_sleeps: tuple[int, float]) -> NodeGroup:
    cmds = [
        [sys.executable, "-c", f"import time, sys; print('up', flush=True); time.sleep({s}); sys.exit({c})"]
        for c, s in codes_and_sleeps
    ]
    lines: list[str] = []
    group = NodeGroup(cmds, cwd=ROOT, env={"PATH": "/usr/bin:/bin"}, log=lines.append)
    group.lines = lines  # type: ignore[attr-defined]
    return group


def test_group_reports_the_first_failing_node_and_prefixes_output():
    group = _group((0, 0.0), (75, 0.0))
    group.start()
    assert group.finish(node0_ok=True) == (2, 75)
    assert "[node 1] up" in group.lines and "[node 2] up" in group.lines  # type: ignore[attr-defined]


def test_group_is_killed_when_node0_failed_or_a_node_hangs():
    group = _group((0, 600.0))
    group.start()
    start = time.monotonic()
    rank, code = group.finish(node0_ok=False)
    assert rank == 1 and code != 0 and time.monotonic() - start < 15
    assert group.procs[0].poll() is not None

    hung = _group((0, 600.0))
    hung.start()
    assert hung.finish(node0_ok=True, wait_s=1.0) == (1, 75)
