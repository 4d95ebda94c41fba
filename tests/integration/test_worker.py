"""A work-pool deployment run by a real ``prefect worker`` (beside the session's served deployment).

After the session's pipeline run, ``python -m flows.deploy`` creates a process work pool and
deploys the pipeline from the project folder; ``prefect worker start`` picks up a run of it. DVC
has nothing to rerun, so the run is short; it must complete, be the worker's, and skip every stage.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import TRIGGER, PrefectServer, Project, stop, wait_until

pytestmark = pytest.mark.integration

POOL = "opensora-test-pool"
DEPLOYMENT = "opensora_pipeline/opensora-worker"

READ_RUN = """
import json, sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    run = client.read_flow_run(sys.argv[1])
    pool = client.read_work_pool(sys.argv[2])
print(json.dumps({"work_pool_name": run.work_pool_name, "pool_type": pool.type}))
"""


def test_worker_runs_the_work_pool_deployment(
    project: Project, prefect_server: PrefectServer, pipeline_run: dict
) -> None:
    env = prefect_server.env
    deployed = project.python(
        "-m", "flows.deploy", "--pool", POOL, "--no-schedule", "--root", str(project.root), env=env
    )
    assert f"on work pool {POOL!r} (created)" in deployed.stdout
    again = project.python(
        "-m", "flows.deploy", "--pool", POOL, "--no-schedule", "--root", str(project.root), env=env
    )
    assert "(created)" not in again.stdout  # a second deploy updates, the pool is reused

    log_path = project.root / "prefect-worker.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
        cwd=project.root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: "started" in log_path.read_text().lower(), 120, "the prefect worker", worker)
        out = project.python("-c", TRIGGER, DEPLOYMENT, str(project.root), "600", env=env, timeout=700)
        run = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        stop(worker)
        log.close()
    worker_log = log_path.read_text()
    assert run["state"] == "COMPLETED", worker_log[-6000:]
    assert run["id"] in worker_log  # this worker submitted it
    info = json.loads(
        project.python("-c", READ_RUN, run["id"], POOL, env=env).stdout.strip().splitlines()[-1]
    )
    assert info == {"work_pool_name": POOL, "pool_type": "process"}
    summary = json.loads((project.root / "reports" / "pipeline_run.json").read_text())
    assert {s["status"] for s in summary["stages"]} == {"skipped"}, summary
    assert len(summary["stages"]) == len(pipeline_run["summary"]["stages"])
