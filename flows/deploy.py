"""Deploy ``opensora_pipeline`` to a Prefect work pool, for workers to run (beside ``flows.serve``).

    prefect server start                                   # or PREFECT_API_URL of a shared server
    python -m flows.deploy --pool opensora                 # creates the process pool, deploys
    prefect worker start --pool opensora                   # on the machine that runs the stages

``flows.serve`` runs the flow inside its own long-lived process; a work pool lets any number of
workers (a process worker here, or a Docker / Kubernetes worker with ``--type docker`` /
``--type kubernetes`` and an image that holds the project) pick up the scheduled runs. The
deployment's code is this project folder (``flow.from_source``): a process worker runs the flow
from it, with the stages' DVC state in ``--root``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import opensora_core  # noqa: F401  (offline environment)
from opensora_core.config import load_config

DEPLOYMENT_NAME = "opensora-worker"
ENTRYPOINT = "flows/pipeline.py:opensora_pipeline"
PROJECT = Path(__file__).resolve().parents[1]


def ensure_work_pool(name: str, pool_type: str) -> bool:
    """Create the work pool ``name`` of ``pool_type`` unless it exists; True when it was created.

    An existing pool of another type is an error naming both types."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            return True
    if pool.type != pool_type:
        raise SystemExit(f"deploy: work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}")
    return False


def deploy(pool: str, name: str, root: Path, cron: str | None) -> str:
    """Deploy the pipeline flow from this project folder to ``pool``; returns the deployment id."""
    from prefect import flow

    remote = flow.from_source(source=str(PROJECT), entrypoint=ENTRYPOINT)
    deployment_id = remote.deploy(
        name=name,
        work_pool_name=pool,
        parameters={"root": str(root)},
        cron=cron,
        description="Open-Sora pipeline over the DVC stages, run by a work pool's workers.",
        tags=["opensora", "dvc"],
        print_next_steps=False,
    )
    return str(deployment_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Deploy the pipeline to a Prefect work pool.")
    parser.add_argument("--pool", default="opensora", help="work pool name (created when missing)")
    parser.add_argument("--type", default="process", help="work pool type: process, docker, kubernetes")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--cron", default=None, help="cron schedule (default: flow.schedule_cron)")
    parser.add_argument("--no-schedule", action="store_true", help="deploy without a schedule")
    parser.add_argument("--root", default=".", help="project root the runs use")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    cron = None if args.no_schedule else (args.cron or cfg.flow.schedule_cron)
    created = ensure_work_pool(args.pool, args.type)
    deployment_id = deploy(args.pool, args.name, Path(args.root).resolve(), cron)
    print(
        f"deploy: opensora_pipeline/{args.name} ({deployment_id}) on work pool {args.pool!r}"
        f"{' (created)' if created else ''}; start a worker: prefect worker start --pool {args.pool}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
