"""The Prefect flow ``opensora_pipeline``: the DVC stages in order, one Prefect task each.

Each task runs ``dvc repro --single-item <stage>``, so DVC's cache decides what runs and
``dvc.lock`` is updated exactly as by a plain ``dvc repro``. A profile and ``--set`` overrides
reach the stages only through files DVC tracks, the way ``dvc exp run -S`` does: the profile
name goes into params.yaml, overrides into the active profile file (or params.yaml when none
is active). Failures are retried only when the stage's exit code says it is worth it.

    python -m flows.pipeline                       # the whole DAG on params.yaml
    python -m flows.pipeline --profile ci.yaml     # on the micro profile
    python -m flows.pipeline --target shard --set shard.rows_per_shard=32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import opensora_core  # noqa: F401  (sets the offline environment before Prefect starts)
from flows.dvc_dag import DVC_RAN, DVC_SKIPPED, command_exit_code, is_retryable, stage_order, upstream_of
from flows.nodes import NodeGroup, node_commands
from opensora_core.config import Config, load_config, parse_overrides, resolve_profile_path
from opensora_core.errors import ConfigError
from opensora_core.process import run_process_group, venv_env
from opensora_core.tracking import PARENT_RUN_ENV

PROGRESS_BAR = re.compile(r"\d+%\|")
PROGRESS_EVERY_S = 10.0


class StageFailed(Exception):
    """A stage ended with a non-zero exit code; ``retryable`` decides whether Prefect retries."""

    def __init__(self, stage: str, code: int, retryable: bool, tail: str) -> None:
        kind = "retryable" if retryable else "not retryable"
        super().__init__(f"stage {stage} failed with exit code {code} ({kind}):\n{tail}")
        self.stage = stage
        self.code = code
        self.retryable = retryable


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran" or "skipped" (DVC found nothing changed)
    seconds: float


def retry_only_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a StageFailed only when its exit code is retryable."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return False
    return bool(getattr(exc, "retryable", False))


@task(name="dvc-stage", retry_condition_fn=retry_only_retryable)
def run_stage(
    stage: str,
    root: str,
    force: bool,
    timeout_s: int,
    parent_run_id: str | None,
    nodes: list[list[str]] | None = None,
) -> StageOutcome:
    """``dvc repro --single-item STAGE`` in its own process group, output streamed to the logs.

    ``nodes``: the commands of a multi-node stage's other nodes (flows/nodes.py), started when DVC
    starts the stage and ended with it, so the task (and its retry) covers the whole group.
    """
    logger = get_run_logger()
    env = venv_env()
    env["DVC_NO_ANALYTICS"] = "1"
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    if force:
        cmd.append("--force")
    lines: deque[str] = deque(maxlen=400)
    last_bar = [0.0]
    group = NodeGroup(nodes or [], cwd=root, env=env, log=lambda line: logger.info("[%s] %s", stage, line))

    def on_line(line: str) -> None:
        lines.append(line)
        if group.commands and not group.started and f"Running stage '{stage}'" in line:
            group.start()
        # Progress bars redraw many times a second: keep one refresh in PROGRESS_EVERY_S, and the end.
        if PROGRESS_BAR.search(line) and "100%|" not in line:
            now = time.monotonic()
            if now - last_bar[0] < PROGRESS_EVERY_S:
                return
            last_bar[0] = now
        logger.info("[%s] %s", stage, line)

    try:
        result = run_process_group(cmd, env=env, cwd=root, timeout_s=timeout_s, on_line=on_line)
    except BaseException:  # a cancel or Ctrl-C: no node may outlive the task
        group.kill()
        raise
    node, node_code = group.finish(node0_ok=result.returncode == 0)
    output = "\n".join(lines)
    if result.returncode == 0 and node_code != 0:
        retryable = is_retryable(node_code, output)
        raise StageFailed(stage, node_code, retryable, f"node {node} of the group exited with {node_code}")
    if result.returncode != 0:
        code = command_exit_code(output, result.returncode)
        retryable = result.timed_out or is_retryable(code, output)
        tail = "\n".join(list(lines)[-25:])
        raise StageFailed(stage, code, retryable, tail)
    ran = any(m.group(1) == stage for m in DVC_RAN.finditer(output))
    skipped = any(m.group(1) == stage for m in DVC_SKIPPED.finditer(output))
    status = "skipped" if skipped and not ran else "ran"
    logger.info("stage %s %s in %.1fs", stage, status, result.seconds)
    return StageOutcome(stage, status, result.seconds)


# ----------------------------------------------------------------------------------------------
# Parameters: profile and overrides written into the files DVC tracks
# ----------------------------------------------------------------------------------------------
def apply_parameters(root: Path, profile: str | None, overrides: list[str]) -> Config:
    """Write ``profile`` into params.yaml and ``overrides`` into the active profile file.

    The resolved config is checked before anything is kept: a bad key restores every file and
    raises ConfigError naming the key.
    """
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    params_path = root / "params.yaml"
    backups: dict[Path, str] = {params_path: params_path.read_text()}
    try:
        params = yaml.load(params_path.read_text()) or {}
        if profile is not None:
            params["profile"] = profile
            _dump(yaml, params, params_path)
        active = params.get("profile") or ""
        tree = parse_overrides(overrides)
        tree.pop("profile", None)
        if tree:
            target = resolve_profile_path(root / "params", active) if active else params_path
            backups.setdefault(target, target.read_text())
            data = yaml.load(target.read_text()) or {}
            _merge_into(data, tree)
            _dump(yaml, data, target)
        return load_config(params_path)
    except BaseException:
        for path, text in backups.items():
            path.write_text(text)
        raise


def _merge_into(node: Any, tree: dict[str, Any]) -> None:
    for key, value in tree.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            _merge_into(node[key], value)
        else:
            node[key] = value


def _dump(yaml: Any, data: Any, path: Path) -> None:
    with path.open("w") as fh:
        yaml.dump(data, fh)


# ----------------------------------------------------------------------------------------------
# Artifacts shown in the Prefect UI
# ----------------------------------------------------------------------------------------------
def publish_artifacts(stage: str, root: Path, mlflow_url: str | None) -> None:
    """Tables and notes for the stages people look at: metadata, validation, evaluation, registry."""
    if stage == "meta" and (root / "data/meta/meta.parquet").exists():
        import pandas as pd

        meta = pd.read_parquet(root / "data/meta/meta.parquet", columns=["status"])
        counts = meta["status"].value_counts().rename_axis("status").reset_index(name="rows")
        create_table_artifact(
            key="metadata-counts", table=counts.to_dict("records"), description="Rows per probe status"
        )
    elif stage == "validate" and (root / "reports/validation.json").exists():
        report = json.loads((root / "reports/validation.json").read_text())
        lines = ["# Validation", ""] + [
            f"- **{k}**: {v}" for k, v in report.items() if not isinstance(v, dict | list)
        ]
        create_markdown_artifact(key="validation-summary", markdown="\n".join(lines))
    elif stage == "evaluate" and (root / "metrics/eval.json").exists():
        metrics = json.loads((root / "metrics/eval.json").read_text())
        rows = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, int | float)]
        create_table_artifact(key="eval-metrics", table=rows, description="metrics/eval.json")
    elif stage == "register" and (root / "models/registry.json").exists():
        reg = json.loads((root / "models/registry.json").read_text())
        lines = ["# Registered model", ""] + [f"- **{k}**: {v}" for k, v in reg.items()]
        if mlflow_url:
            lines.append(f"- MLflow: {mlflow_url}")
        create_markdown_artifact(key="registered-model", markdown="\n".join(lines))


# ----------------------------------------------------------------------------------------------
# The flow
# ----------------------------------------------------------------------------------------------
@flow(name="opensora_pipeline", log_prints=True)
def opensora_pipeline(
    target: str | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    root: str = ".",
) -> dict[str, Any]:
    """Run the DVC DAG up to ``target`` (default: every stage), one Prefect task per stage."""
    logger = get_run_logger()
    start = time.monotonic()
    root_path = Path(root).resolve()
    cfg = apply_parameters(root_path, profile, overrides or [])
    stages = upstream_of(root_path, target) if target else stage_order(root_path)
    logger.info("stages: %s (profile %r)", " -> ".join(stages), cfg.profile)

    parent = start_parent_run(cfg, root_path)
    outcomes: list[StageOutcome] = []
    previous: list[Any] = []
    status = "FAILED"
    try:
        for stage in stages:
            timeout = cfg.flow.stage_timeout_s.get(stage, cfg.flow.default_timeout_s)
            runner = run_stage.with_options(
                name=f"stage-{stage}",
                task_run_name=stage,
                retries=cfg.flow.retries,
                retry_delay_seconds=cfg.flow.retry_delay_s,
            )
            # wait_for on the previous stage draws the DAG's edges in the Prefect UI.
            nodes = node_commands(root_path, stage, cfg)
            state = runner(
                stage, str(root_path), force, timeout, parent, nodes, wait_for=previous, return_state=True
            )
            outcome = state.result()  # raises the stage's StageFailed
            previous = [state]
            outcomes.append(outcome)
            publish_artifacts(stage, root_path, mlflow_run_url(cfg, parent))
        status = "FINISHED"
    finally:
        wall = time.monotonic() - start
        summary = summarize(outcomes, wall, cfg, parent, root_path)
        end_parent_run(cfg, parent, status, summary)
    return summary


def summarize(
    outcomes: list[StageOutcome], wall: float, cfg: Config, parent: str | None, root: Path
) -> dict[str, Any]:
    stage_seconds = sum(o.seconds for o in outcomes)
    summary = {
        "stages": [asdict(o) for o in outcomes],
        "wall_seconds": round(wall, 2),
        "stage_seconds": round(stage_seconds, 2),
        "orchestration_overhead_seconds": round(wall - stage_seconds, 2),
        "mlflow_run_id": parent,
        "profile": cfg.profile,
    }
    out = root / "reports" / "pipeline_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return summary


def start_parent_run(cfg: Config, root: Path) -> str | None:
    if not cfg.tracking.enabled:
        return None
    from opensora_core.tracking import get_client, get_experiment_id, git_commit

    exp_id = get_experiment_id(cfg.tracking, root)
    tags = {"stage": "pipeline", "profile": cfg.profile or "default"}
    commit = git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = get_client(cfg.tracking).create_run(exp_id, run_name="pipeline", tags=tags)
    return run.info.run_id


def end_parent_run(cfg: Config, run_id: str | None, status: str, summary: dict[str, Any]) -> None:
    if not run_id:
        return
    from opensora_core.tracking import get_client

    client = get_client(cfg.tracking)
    for o in summary["stages"]:
        client.log_metric(run_id, f"seconds_{o['stage']}", o["seconds"])
    client.log_metric(run_id, "wall_seconds", summary["wall_seconds"])
    client.log_metric(run_id, "orchestration_overhead_seconds", summary["orchestration_overhead_seconds"])
    client.log_dict(run_id, summary, "pipeline_run.json")
    client.set_terminated(run_id, status=status)


def mlflow_run_url(cfg: Config, run_id: str | None) -> str | None:
    if not run_id:
        return None
    return f"mlflow ui --backend-store-uri {os.environ.get('MLFLOW_TRACKING_URI', cfg.tracking.uri)} -> run {run_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Open-Sora pipeline (DVC stages) through Prefect.")
    parser.add_argument("--target", default=None, help="last stage to run (default: all)")
    parser.add_argument("--profile", default=None, help="profile file in params/ (written into params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="rerun stages even when DVC finds no change")
    parser.add_argument("--root", default=".", help="project root (default: .)")
    args = parser.parse_args(argv)
    try:
        # Fail on a bad key before a Prefect server starts or any file is written.
        profile = [f"profile={args.profile}"] if args.profile is not None else []
        load_config(Path(args.root) / "params.yaml", profile + args.overrides)
        summary = opensora_pipeline(
            target=args.target,
            profile=args.profile,
            overrides=args.overrides,
            force=args.force,
            root=args.root,
        )
    except ConfigError as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return exc.code if 0 < exc.code < 256 else 1
    print_where(summary, Path(args.root))
    return 0


def print_where(summary: dict[str, Any], root: Path) -> None:
    ran = sum(1 for s in summary["stages"] if s["status"] == "ran")
    print(
        f"pipeline: {len(summary['stages'])} stages ({ran} ran, {len(summary['stages']) - ran} up to date) "
        f"in {summary['wall_seconds']:.0f}s, orchestration overhead {summary['orchestration_overhead_seconds']:.1f}s"
    )
    places = {
        "samples": root / "reports/eval",
        "metrics": root / "metrics",
        "registry": root / "models/registry.json",
        "run summary": root / "reports/pipeline_run.json",
    }
    for label, path in places.items():
        if path.exists():
            print(f"  {label:12s} {path}")
    if summary.get("mlflow_run_id"):
        print(f"  {'mlflow run':12s} {summary['mlflow_run_id']} (make ui-mlflow)")


if __name__ == "__main__":
    sys.exit(main())
