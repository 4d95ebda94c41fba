"""MLflow tracking behind one small interface: one run per stage, nested under the pipeline run.

The tracking store is ``sqlite:///mlflow.db`` by default (``MLFLOW_TRACKING_URI`` overrides it),
the experiment ``opensora`` stores its artifacts in ``mlartifacts/``. Against a tracking server
(an ``http(s)://`` URI) the experiment is created without a location of its own, so the server
stores artifacts where its ``--artifacts-destination`` says (``mlflow-artifacts:/`` URIs) and
every client reads them through it. When the Prefect flow drives
the stages it passes its run id in ``OPENSORA_PARENT_RUN_ID`` and every stage run nests under it.
In distributed jobs only rank 0 logs: the other ranks get a :class:`NullRun`.

MLflow is imported lazily, inside :func:`start_stage_run`, so importing this module stays cheap.
Light CLIs that must not import MLflow at all (``tasks.meta``) call :func:`log_in_subprocess`.

Run as a module it logs a JSON payload (``python -m opensora_core.tracking --stage meta
--payload FILE``), which is what :func:`log_in_subprocess` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opensora_core.config import TrackingConfig

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "OPENSORA_PARENT_RUN_ID"


class NullRun:
    """A run that logs nothing: tracking disabled, or a rank other than 0."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: Any, artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_metrics(metrics, step)

    def close(self) -> None:
        pass


class MlflowRun(NullRun):
    """An active MLflow run; every call goes to that run, whatever the fluent API's state."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [
            Metric(key=_clean_key(k), value=float(v), timestamp=ts, step=step or 0)
            for k, v in metrics.items()
            if v is not None
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        batch = [Param(_clean_key(k), str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            log.warning("not logging missing artifact %s", path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _clean_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def tracking_uri(cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri


def is_tracking_server(uri: str) -> bool:
    """True for a tracking server (``http(s)://``), which owns where artifacts go."""
    return uri.startswith(("http://", "https://"))


def get_client(cfg: TrackingConfig) -> Any:
    """An MlflowClient on the configured store (never the global tracking URI, which
    ``mlflow.set_tracking_uri`` also exports to the environment of every later process)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_experiment_id(cfg: TrackingConfig, root: Path | None = None) -> str:
    """The experiment's id, creating it on first use: with ``artifact_dir`` as its location on a
    local store, with the server's proxied artifact store behind a tracking server."""
    client = get_client(cfg)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not is_tracking_server(tracking_uri(cfg)):
        path = (Path(root or Path.cwd()) / cfg.artifact_dir).resolve()
        path.mkdir(parents=True, exist_ok=True)
        location = path.as_uri()
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def start_stage_run(
    stage: str,
    cfg: TrackingConfig,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    rank: int = 0,
    root: Path | None = None,
) -> Iterator[NullRun]:
    """A run for one stage, nested under ``OPENSORA_PARENT_RUN_ID`` when set; FAILED on error."""
    if not cfg.enabled or rank != 0:
        yield NullRun()
        return
    exp_id = get_experiment_id(cfg, root)
    client = get_client(cfg)
    run_tags = {"stage": stage, "mlflow.runName": stage, **{k: str(v) for k, v in (tags or {}).items()}}
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    commit = git_commit(root)
    if commit:
        run_tags["mlflow.source.git.commit"] = commit
    run = client.create_run(exp_id, run_name=stage, tags=run_tags)
    handle = MlflowRun(client, run.info.run_id)
    if params:
        handle.log_params(params)
    try:
        yield handle
    except BaseException:
        handle.close("FAILED")
        raise
    handle.close("FINISHED")


def git_commit(root: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def log_in_subprocess(stage: str, cfg: TrackingConfig, payload: Mapping[str, Any]) -> int:
    """Log a stage run from a child process, so the caller never imports MLflow.

    ``payload`` may hold ``params``, ``metrics``, ``tags`` (mappings) and ``artifacts`` (paths).
    A failure to log is reported and returned, never raised: tracking must not fail a stage.
    """
    if not cfg.enabled:
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"tracking": vars(cfg), **payload}, fh, default=str)
        path = fh.name
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "opensora_core.tracking", "--stage", stage, "--payload", path],
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        log.warning("MLflow logging of %s failed: %s", stage, proc.stderr.strip()[-500:])
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Log a JSON payload as one MLflow stage run.")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--payload", required=True, help="JSON with params, metrics, tags, artifacts")
    args = parser.parse_args(argv)
    payload = json.loads(Path(args.payload).read_text())
    cfg = TrackingConfig(**payload.get("tracking", {}))
    with start_stage_run(args.stage, cfg, params=payload.get("params"), tags=payload.get("tags")) as run:
        run.log_metrics(payload.get("metrics", {}))
        for artifact in payload.get("artifacts", []):
            run.log_artifact(artifact)
        print(run.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
