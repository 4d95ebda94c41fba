"""Stage ``diffusion_NAME``: train one stage of ``diffusion.stages`` as a torchrun job.

    python -m tasks.diffusion_train --stage stage1 [--params P] [--set section.key=value ...]
        [--load PATH [--load-optimizer | --reset-optimizer] [--reset-step] [--redo-warmup]]

The configuration, the stage name and the input paths are checked here, so a mistake exits with
code 2 before anything launches; then ``opensora_core.jobs.train_diffusion`` runs under torchrun
with the ``launch`` section (one process per GPU, or one on CPU). It writes
``models/diffusion/NAME/final/`` (weights, EMA weights, configs), ``models/diffusion/NAME/ckpt/``
(resumable checkpoints), ``metrics/diffusion_NAME_loss.csv`` (the loss curve) and
``metrics/diffusion_NAME.json`` (the summary). The job's exit code is the stage's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config
from opensora_core.distributed.launcher import run_job
from opensora_core.errors import JobFailed
from opensora_core.training.diffusion_stage import is_registry_uri, previous_stage
from opensora_core.training.diffusion_trainer import LoadOptions, StagePaths, summary_line, validate_stage

JOB = "opensora_core.jobs.train_diffusion"


def job_arguments(
    stage: str, paths: StagePaths, load: LoadOptions, params: str, overrides: list[str], quiet: bool = False
) -> list[str]:
    """The job's command line: the same config (params file and overrides), stage, paths and load options."""
    args = ["--stage", stage, "--params", params]
    for item in overrides:
        args += ["--set", item]
    args += [
        "--shards", str(paths.shards),
        "--vae", str(paths.vae),
        "--latent-stats", str(paths.latent_stats),
        "--models-dir", str(paths.models),
        "--metrics-dir", str(paths.metrics),
    ]  # fmt: skip
    if load.path:
        args += ["--load", load.path]
        if load.optimizer is not None:
            args.append("--load-optimizer" if load.optimizer else "--reset-optimizer")
        args += ["--reset-step"] * load.reset_step + ["--redo-warmup"] * load.redo_warmup
    return args + ["--quiet"] * quiet


def maybe_fetch_init(cfg: Config, stage: str) -> Path | None:
    """Download the registered model a first stage's ``diffusion.init_from`` names
    (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) before the job starts, unless the cached
    copy holds that version already; returns the weights file, or None (nothing to fetch)."""
    dcfg = cfg.diffusion
    if previous_stage(dcfg, stage) is not None or not is_registry_uri(dcfg.init_from):
        return None
    from opensora_core.inference.adapters import fetch_init_weights
    from opensora_core.tracking import tracking_uri

    return fetch_init_weights(dcfg.init_from, dcfg.cache_dir, tracking_uri(cfg.tracking))


def run_diffusion_stage(
    cfg: Config,
    stage: str,
    paths: StagePaths,
    *,
    load: LoadOptions | None = None,
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    quiet: bool = False,
) -> str:
    """Validate, launch the job and return the one-line summary; raises with the job's exit code."""
    load = load or LoadOptions()
    if not load.path:
        maybe_fetch_init(cfg, stage)  # a registry init_from, copied before the job starts
    validate_stage(cfg, stage, paths, load)
    code = run_job(JOB, job_arguments(stage, paths, load, params, overrides or [], quiet), cfg.launch)
    if code != 0:
        raise JobFailed(code, f"training job of diffusion stage {stage!r} failed with exit code {code}")
    return summary_line(json.loads(paths.summary(stage).read_text()))


def stage(args: argparse.Namespace, cfg: Config) -> str:
    paths = StagePaths(
        Path(args.shards),
        Path(args.vae),
        Path(args.latent_stats),
        Path(args.models_dir),
        Path(args.metrics_dir),
    )
    load = LoadOptions(args.load, args.load_optimizer, args.reset_step, args.redo_warmup)
    return run_diffusion_stage(
        cfg, args.stage, paths, load=load, params=args.params, overrides=args.overrides, quiet=args.quiet
    )


def build_diffusion_parser() -> argparse.ArgumentParser:
    parser = build_parser(
        "Train one diffusion stage (MMDiT, rectified flow) as a torchrun job.", "diffusion_train"
    )
    parser.add_argument(
        "--stage", required=True, help="a stage name of diffusion.stages (stage1, stage2, ...)"
    )
    parser.add_argument("--load", default="", help="start from a checkpoint folder (step-N) or weights")
    optimizer = parser.add_mutually_exclusive_group()
    optimizer.add_argument(
        "--load-optimizer",
        dest="load_optimizer",
        action="store_const",
        const=True,
        default=None,
        help="with --load: restore the optimizer state (the default for a checkpoint folder)",
    )
    optimizer.add_argument(
        "--reset-optimizer",
        dest="load_optimizer",
        action="store_const",
        const=False,
        help="with --load: start a fresh optimizer",
    )
    parser.add_argument("--reset-step", action="store_true", help="with --load: count steps from 0")
    parser.add_argument("--redo-warmup", action="store_true", help="with --load: run the LR warmup again")
    parser.add_argument("--shards", default="data/shards", help="shard folder (default: data/shards)")
    parser.add_argument("--vae", default="models/vae/final", help="the VAE's final/ folder")
    parser.add_argument("--latent-stats", default="models/vae/latent_stats.json", help="latent statistics")
    parser.add_argument("--models-dir", default="models/diffusion", help="stage outputs go to DIR/NAME/")
    parser.add_argument("--metrics-dir", default="metrics", help="loss curve and summary folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_diffusion_parser(), argv, stage, name="diffusion_train")


if __name__ == "__main__":
    sys.exit(main())
