"""Job: train the video autoencoder, on every rank of a torchrun launch (``tasks.vae_train`` starts it).

    torchrun --standalone --nproc-per-node N -m opensora_core.jobs.train_vae \\
        [--params params.yaml] [--set section.key=value ...]

The work is :func:`opensora_core.training.vae_trainer.train_vae`; this module parses the
arguments, joins the process group and reports the outcome through the job wrapper (exit codes
2 bad input, 4 out of memory, 5 non-finite loss, 75 retryable).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opensora_core.jobs.common import job_entrypoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the video autoencoder (run under torchrun).")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--shards", type=Path, default=Path("data/shards"))
    p.add_argument("--final", type=Path, default=Path("models/vae/final"))
    p.add_argument("--ckpt", type=Path, default=Path("models/vae/ckpt"))
    p.add_argument("--metrics", type=Path, default=Path("metrics/vae.json"))
    p.add_argument("--loss-csv", type=Path, default=Path("metrics/vae_train_loss.csv"))
    p.add_argument("--reports", type=Path, default=Path("reports/vae"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@job_entrypoint
def main() -> None:
    args = parse_args()
    # Imported after parsing: --help answers without loading torch and diffusers.
    from opensora_core.cli import setup_logging
    from opensora_core.config import load_config
    from opensora_core.distributed.dist import init_distributed
    from opensora_core.training.vae_trainer import VaePaths, train_vae

    setup_logging()
    cfg = load_config(args.params, args.overrides)
    paths = VaePaths(args.shards, args.final, args.ckpt, args.metrics, args.loss_csv, args.reports)
    info = init_distributed()
    summary = train_vae(cfg, paths, info, progress=not args.quiet)
    if info.rank == 0:
        resumed = f", resumed from {summary['resumed_from']}" if summary["resumed_from"] else ""
        print(
            f"train_vae: {summary['steps_run']} steps to step {summary['step']} in {summary['seconds']:.0f}s"
            f"{resumed}; val psnr {summary['psnr']:.2f} dB vs mean-frame baseline "
            f"{summary['psnr_baseline']:.2f} dB, ssim {summary['ssim']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
