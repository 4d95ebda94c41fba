"""Stage ``vae_train``: train the video autoencoder as a torchrun + ColossalAI job.

    python -m tasks.vae_train [--params P] [--set section.key=value ...]

The configuration and the shards are checked here, so a mistake exits with code 2 before
anything launches; then ``opensora_core.jobs.train_vae`` runs under torchrun with the ``launch``
section. It writes ``models/vae/final/`` (weights, EMA weights, configs), ``models/vae/ckpt/``
(resumable checkpoints; a rerun resumes the latest one whose config matches),
``metrics/vae.json`` (val PSNR, SSIM and the mean-frame baseline) and
``metrics/vae_train_loss.csv``. The job's exit code is the stage's. ``vae_train.init_from`` (a
VAE folder or ``models:/NAME@ALIAS``, fetched here first) with ``steps: 0`` reuses an existing
VAE: it is written to ``final/`` and measured on the current data.
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

JOB = "opensora_core.jobs.train_vae"


def check_inputs(shards: Path) -> None:
    if not (shards / "manifest.json").is_file():
        raise InputError(f"no shards in {shards} (run the shard stage first)")


def maybe_fetch_vae(cfg: Config) -> None:
    """A registry ``vae_train.init_from`` is downloaded (its bundle) before the job starts."""
    init = cfg.vae_train.init_from
    if init.startswith("models:/"):
        from opensora_core.inference.sources import fetch_registered_bundle
        from opensora_core.tracking import tracking_uri

        fetch_registered_bundle(init, cfg.diffusion.cache_dir, tracking_uri(cfg.tracking))
    elif init and not Path(init).is_dir():
        raise InputError(f"vae_train.init_from: {init} is neither a models:/ URI nor a folder")


def stage(args: argparse.Namespace, cfg: Config) -> str:
    check_inputs(Path(args.shards))
    maybe_fetch_vae(cfg)
    job_args = ["--params", args.params]
    for item in args.overrides:
        job_args += ["--set", item]
    job_args += ["--shards", args.shards, "--metrics", args.metrics] + ["--quiet"] * args.quiet
    code = run_job(JOB, job_args, cfg.launch)
    if code != 0:
        raise JobFailed(code, f"VAE training job failed with exit code {code}")
    metrics = json.loads(Path(args.metrics).read_text())
    return (
        f"{cfg.vae_train.steps} steps; val psnr {metrics['psnr']:.2f} dB "
        f"(mean-frame baseline {metrics['psnr_baseline']:.2f} dB), ssim {metrics['ssim']:.3f} -> models/vae/final"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("Train the video autoencoder (torchrun + ColossalAI).", "vae_train")
    parser.add_argument("--shards", default="data/shards", help="shard folder (default: data/shards)")
    parser.add_argument(
        "--metrics", default="metrics/vae.json", help="metrics file (default: metrics/vae.json)"
    )
    return run_cli(parser, argv, stage)


if __name__ == "__main__":
    sys.exit(main())
