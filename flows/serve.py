"""Serve ``opensora_pipeline`` as a scheduled deployment (cron from params: ``flow.schedule_cron``).

    prefect server start                 # terminal 1: the UI on http://127.0.0.1:4200
    python -m flows.serve                # terminal 2: registers the deployment and runs it on schedule

The nightly run reruns the pipeline; DVC makes the no-change case cheap (every stage skipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import opensora_core  # noqa: F401  (offline environment)
from flows.pipeline import opensora_pipeline
from opensora_core.config import load_config

DEPLOYMENT_NAME = "opensora-nightly"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the pipeline as a scheduled Prefect deployment.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name")
    parser.add_argument("--cron", default=None, help="cron schedule (default: flow.schedule_cron)")
    parser.add_argument(
        "--no-schedule", action="store_true", help="serve without a schedule (runs on demand)"
    )
    parser.add_argument("--root", default=".", help="project root the runs use")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    cron = None if args.no_schedule else (args.cron or cfg.flow.schedule_cron)
    opensora_pipeline.serve(
        name=args.name,
        cron=cron,
        parameters={"root": str(Path(args.root).resolve())},
        description="Open-Sora pipeline over the DVC stages; reruns only what changed.",
        tags=["opensora", "dvc"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
