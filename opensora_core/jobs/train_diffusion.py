"""Job: train one diffusion stage, on every rank of a torchrun launch (``tasks.diffusion_train`` starts it).

    torchrun --standalone --nproc-per-node N -m opensora_core.jobs.train_diffusion --stage stage1 \\
        [--params params.yaml] [--set section.key=value ...] [--load PATH [--reset-optimizer] ...]

The work is :func:`opensora_core.training.diffusion_trainer.train_stage`; this module parses the
arguments, joins the process group and reports the outcome through the job wrapper (exit codes
2 bad input, 4 out of memory, 5 non-finite loss, 75 retryable).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opensora_core.jobs.common import job_entrypoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train one diffusion stage (run under torchrun).")
    p.add_argument("--stage", required=True, help="a name in diffusion.stages")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--load", default="", help="checkpoint folder or weights to start from")
    optimizer = p.add_mutually_exclusive_group()
    optimizer.add_argument("--load-optimizer", dest="load_optimizer", action="store_const", const=True)
    optimizer.add_argument("--reset-optimizer", dest="load_optimizer", action="store_const", const=False)
    p.add_argument("--reset-step", action="store_true", help="count steps from 0 after --load")
    p.add_argument("--redo-warmup", action="store_true", help="run the LR warmup again after --load")
    p.add_argument("--shards", type=Path, default=Path("data/shards"))
    p.add_argument("--vae", type=Path, default=Path("models/vae/final"))
    p.add_argument("--latent-stats", type=Path, default=Path("models/vae/latent_stats.json"))
    p.add_argument("--models-dir", type=Path, default=Path("models/diffusion"))
    p.add_argument("--metrics-dir", type=Path, default=Path("metrics"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@job_entrypoint
def main() -> None:
    args = parse_args()
    # Imported after parsing: --help answers without loading torch and the models.
    from opensora_core.cli import setup_logging
    from opensora_core.config import load_config
    from opensora_core.distributed.dist import init_distributed
    from opensora_core.training.diffusion_trainer import LoadOptions, StagePaths, summary_line, train_stage

    setup_logging()
    cfg = load_config(args.params, args.overrides)
    paths = StagePaths(args.shards, args.vae, args.latent_stats, args.models_dir, args.metrics_dir)
    load = LoadOptions(args.load, args.load_optimizer, args.reset_step, args.redo_warmup)
    info = init_distributed()
    summary = train_stage(cfg, args.stage, paths, info, load, progress=not args.quiet)
    if info.rank == 0:
        print(f"train_diffusion: {summary_line(summary)}", flush=True)


if __name__ == "__main__":
    main()
