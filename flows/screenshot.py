"""Screenshots of the Prefect UI showing the served deployment and a completed run.

    python -m flows.screenshot [--out-dir reports] [--chromium /usr/bin/chromium]

1. Start a Prefect server (UI on) on a free loopback port, on this machine's PREFECT_HOME.
2. Serve the deployment (``flows.serve``) until the server knows it, and trigger one run
   through the Prefect client; it completes quickly when DVC finds nothing changed.
3. Headless Chromium saves ``prefect_deployment.png`` (the deployment, its schedule and runs)
   and ``prefect_flow_run.png`` (the completed run with one task per stage) in ``--out-dir``.

Needs Debian's chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import opensora_core  # noqa: F401  (offline environment)
from flows.serve import DEPLOYMENT_NAME
from opensora_core.process import kill_process_tree, venv_env

FLOW_NAME = "opensora_pipeline"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


async def deployment_id(api_url: str) -> str:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        dep = await client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT_NAME}")
        return str(dep.id)


def screenshot(chromium: str, url: str, out: Path) -> None:
    with_profile = out.parent / ".chromium-profile"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={with_profile}",
        "--hide-scrollbars",
        "--window-size=1600,1000",
        "--virtual-time-budget=20000",
        f"--screenshot={out}",
        url,
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    shutil.rmtree(with_profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot the Prefect UI with the deployment and a run.")
    parser.add_argument("--out-dir", default="reports")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    if not Path(args.chromium).exists():
        print(
            f"screenshot: chromium not found at {args.chromium} (apt-get install chromium)", file=sys.stderr
        )
        return 2
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = venv_env()
    env["PREFECT_API_URL"] = f"{base}/api"
    env.pop("PREFECT_UI_ENABLED", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    serve = None
    try:
        wait_for(lambda: urllib.request.urlopen(f"{base}/api/health", timeout=2).status == 200, 120, "server")
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--root", str(Path(args.root).resolve())],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        dep: list[str] = []
        wait_for(lambda: dep.append(asyncio.run(deployment_id(f"{base}/api"))) or True, 180, "deployment")
        trigger = (
            "import sys; from prefect.deployments import run_deployment; "
            "r = run_deployment(sys.argv[1], timeout=1800); print(r.id, r.state.type.value)"
        )
        out = subprocess.run(
            [sys.executable, "-c", trigger, f"{FLOW_NAME}/{DEPLOYMENT_NAME}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        run_id, state = out.stdout.split()[-2:]
        print(f"screenshot: run {run_id} ended {state}")
        shots = {
            out_dir / "prefect_deployment.png": f"{base}/deployments/deployment/{dep[-1]}",
            out_dir / "prefect_flow_run.png": f"{base}/runs/flow-run/{run_id}",
        }
        for path, url in shots.items():
            screenshot(args.chromium, url, path)
            print(f"screenshot: {path}")
    finally:
        for proc in (serve, server):
            if proc is not None:
                kill_process_tree(proc, grace_s=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
