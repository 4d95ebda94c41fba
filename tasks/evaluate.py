"""Stage ``evaluate``: validation flow loss, VAE reconstruction, samples and prompt adherence.

    python -m tasks.evaluate [--stage NAME | --model DIR] [--params P] [--set section.key=value ...]

The configuration and the inputs (the model's ``final/`` folder, the VAE, its latent statistics,
the shards' held-out rows, ``labels.parquet``) are checked here, so a mistake exits with code 2 before anything
launches; then ``opensora_core.jobs.evaluate`` runs under torchrun with the ``launch`` section (one
process per GPU, or one on CPU) and does the work: the flow loss at ``evaluate.val_timesteps`` on
up to ``evaluate.max_val_clips`` held-out clips, the VAE's reconstruction scores on them, samples
at seeds ``evaluate.seed + i``, their prompt adherence when the data has labels, and ``fvd_vae``
(the Fréchet distance between the samples and the held-out clips in the VAE's latent space, lower
is better; not the I3D FVD of the literature). The ranks split the batches and rank 0
gathers and writes, so the results do not depend on the number of processes (see the job).

Writes ``metrics/eval.json`` (``val_loss``, ``val_loss_by_t``, ``vae_psnr``, ``vae_ssim``,
``fvd_vae``, ``adherence_*``, ``chance_*`` (null without labels), ``num_samples``, ...) and ``reports/eval/`` (``samples/`` mp4s with
a ``.txt`` each, ``grid.png``, ``adherence.csv``, ``val_loss_by_t.csv``, ``metrics.png``), all
logged to MLflow. Everything is seeded: two runs on CPU write the same ``metrics/eval.json``.
The job's exit code is the stage's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config
from opensora_core.distributed.launcher import run_job
from opensora_core.errors import ConfigError, InputError, JobFailed

JOB = "opensora_core.jobs.evaluate"
DEFAULT_MODELS = Path("models")


def default_stage(cfg: Config) -> str:
    """The evaluated diffusion stage: ``evaluate.stage``, else the last of ``diffusion.stages``."""
    return cfg.evaluate.stage or list(cfg.diffusion.stages)[-1]


def model_dir_of(args: argparse.Namespace, cfg: Config) -> Path:
    """``--model``, else the ``final/`` folder of ``--stage`` (or the default stage); ConfigError
    naming the valid stages for an unknown one."""
    if args.model:
        return Path(args.model)
    name = args.stage or default_stage(cfg)
    if name not in cfg.diffusion.stages:
        where = "--stage" if args.stage else "evaluate.stage"
        raise ConfigError(
            f"{where} {name!r} is not a diffusion stage; valid: {', '.join(cfg.diffusion.stages)}"
        )
    return DEFAULT_MODELS / "diffusion" / name / "final"


def check_inputs(model_dir: Path, vae: Path, latent_stats: Path, shards: Path, labels: Path) -> None:
    """Every input the job reads, with InputError (exit 2) naming the first missing one."""
    from opensora_core.data.shards import ShardReader
    from opensora_core.evaluation.samples import read_labels

    if not (model_dir / "mmdit_config.json").is_file():
        what = (
            "is not a diffusion final/ folder (no mmdit_config.json)" if model_dir.is_dir() else "not found"
        )
        raise InputError(f"evaluated model {model_dir} {what} (run the diffusion stages first)")
    if not vae.is_dir():
        raise InputError(f"VAE folder {vae} not found (run the vae_train stage first)")
    if not latent_stats.is_file():
        raise InputError(f"latent statistics {latent_stats} not found (run the vae_stats stage first)")
    if not (shards / "manifest.json").is_file():
        raise InputError(f"{shards / 'manifest.json'} not found (run the shard stage first)")
    try:
        held_out = len(ShardReader(shards, split="val"))
    except InputError as exc:
        raise InputError(f"{exc} (the evaluate stage needs held-out rows)") from exc
    if held_out == 0:
        raise InputError(f"no val rows in {shards} (the evaluate stage needs held-out rows)")
    read_labels(labels)


def job_arguments(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """The job's command line: the same config (params file and overrides), model and paths."""
    out = ["--model", str(model_dir), "--params", args.params]
    for item in args.overrides:
        out += ["--set", item]
    out += [
        "--vae", args.vae,
        "--latent-stats", args.latent_stats,
        "--shards", args.shards,
        "--labels", args.labels,
        "--metrics", args.metrics,
        "--report-dir", args.report_dir,
    ]  # fmt: skip
    return out + ["--quiet"] * args.quiet


def stage(args: argparse.Namespace, cfg: Config) -> str:
    from opensora_core.jobs.evaluate import summary

    model_dir = model_dir_of(args, cfg)
    check_inputs(model_dir, Path(args.vae), Path(args.latent_stats), Path(args.shards), Path(args.labels))
    code = run_job(JOB, job_arguments(args, model_dir), cfg.launch)
    if code != 0:
        raise JobFailed(code, f"evaluation job of {model_dir} failed with exit code {code}")
    return summary(json.loads(Path(args.metrics).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "Evaluate the last diffusion stage (torchrun job): val loss, VAE reconstruction, samples, "
        "prompt adherence.",
        prog="evaluate",
    )
    parser.add_argument(
        "--stage", default="", help="diffusion stage to evaluate (default: evaluate.stage or the last)"
    )
    parser.add_argument("--model", default="", help="a diffusion final/ folder (overrides --stage)")
    parser.add_argument("--vae", default="models/vae/final", help="the VAE's final/ folder")
    parser.add_argument("--latent-stats", default="models/vae/latent_stats.json")
    parser.add_argument("--shards", default="data/shards", help="shard folder (its val rows are used)")
    parser.add_argument(
        "--labels",
        default="data/raw/labels.parquet",
        help="ground truth from ingest (no rows for a folder or CSV source: adherence is skipped)",
    )
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--report-dir", default="reports/eval")
    return run_cli(parser, argv, stage)


if __name__ == "__main__":
    sys.exit(main())
