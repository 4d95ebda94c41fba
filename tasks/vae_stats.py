"""Stage ``vae_stats``: exact per-channel latent statistics of the trained VAE, as a torchrun job.

    python -m tasks.vae_stats [--params P] [--set section.key=value ...]

Writes ``models/vae/latent_stats.json`` (mean and std per latent channel, scale, shift,
num_samples, vae_sha256). The diffusion stages read it as a DVC dependency.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config
from opensora_core.distributed.launcher import run_job
from opensora_core.errors import InputError, JobFailed

JOB = "opensora_core.jobs.vae_stats"


def stage(args: argparse.Namespace, cfg: Config) -> str:
    for path in (Path(args.shards) / "manifest.json", Path(args.vae)):
        if not path.exists():
            raise InputError(f"{path} not found (run the shard and vae_train stages first)")
    job_args = ["--params", args.params]
    for item in args.overrides:
        job_args += ["--set", item]
    job_args += ["--shards", args.shards, "--vae", args.vae, "--output", args.output]
    code = run_job(JOB, job_args, cfg.launch)
    if code != 0:
        raise JobFailed(code, f"latent statistics job failed with exit code {code}")
    stats = json.loads(Path(args.output).read_text())
    return f"{stats['num_samples']} clips, {len(stats['mean'])} channels -> {args.output}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("Exact per-channel latent statistics of the VAE (torchrun job).", "vae_stats")
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--vae", default="models/vae/final")
    parser.add_argument("--output", default="models/vae/latent_stats.json")
    return run_cli(parser, argv, stage)


if __name__ == "__main__":
    sys.exit(main())
