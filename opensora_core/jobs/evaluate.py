"""Job: the evaluate stage's work, on every rank of a torchrun launch (``tasks.evaluate`` starts it).

    torchrun --standalone --nproc-per-node N -m opensora_core.jobs.evaluate --model DIR \\
        [--params P] [--set section.key=value ...] [--vae DIR] [--latent-stats JSON] [--shards DIR] \\
        [--labels PARQUET] [--metrics JSON] [--report-dir DIR] [--quiet]

1. loads the evaluated diffusion stage's ``final/`` model with the VAE and its latent statistics;
2. held-out (``val``) shard rows, each cut to its bucket of the evaluated stage: the rectified-flow
   loss at the fixed times ``evaluate.val_timesteps`` (noise drawn per row and time from fixed
   seeds), overall, per time and per bucket; the VAE's reconstruction PSNR/SSIM on the same clips
   (whole, at their own size, with the VAE stage's helpers);
3. samples at seeds ``seed + i`` for prompts built from the held-out label combinations, or,
   when ``labels.parquet`` has no rows (a user's folder or CSV: no ground truth), for the
   held-out rows' own captions;
4. prompt adherence measured from the samples' pixels (colour, motion, shape), only with labels
   (else ``adherence_*``/``chance_*`` are null and the log and the MLflow tag
   ``adherence_skipped`` say why); and for every dataset ``fvd_vae``, the Fréchet distance
   between the samples and the held-out clips in the VAE's latent space (lower is better;
   :mod:`opensora_core.evaluation.frechet`: not the I3D FVD of the literature, so not
   comparable with published figures), computed on rank 0;
5. rank 0 writes ``metrics/eval.json`` and ``reports/eval/`` (``samples/`` mp4s with a ``.txt``
   beside each, ``grid.png``, ``adherence.csv``, ``val_loss_by_t.csv``, ``metrics.png``) and logs
   all of it to MLflow.

How the work is split. Every rank builds the same three work lists from the config and the data:
the val batches (rows grouped by bucket, in sorted bucket order, cut into ``evaluate.batch_size``),
the val rows for the reconstruction check, and the sample batches (prompts in order,
``evaluate.batch_size`` at a time). Rank r takes the items j with ``j % world_size == r``; rank 0
gathers every rank's results (``gather_object``) and reduces them in the lists' order: the loss is
a pooled sum over every clip and time divided by the clip count, the reconstruction errors are
pooled as in the VAE stage, the samples are put back in prompt order. A batch holds the same clips
or prompts whatever the world size and sample i draws its noise from its own generator seeded
``seed + i``, so 1 and N ranks do the same arithmetic on the same hardware and write the same
``metrics/eval.json`` and sample frames. Batches are the unit of work: ranks beyond the number of
batches wait (lower ``evaluate.batch_size`` to spread a few prompts over many GPUs).

Called in-process (tests, a notebook), :func:`evaluate` runs the whole evaluation with world size 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from opensora_core.config import Config
from opensora_core.distributed.work import gather_to_main as gather_to_main
from opensora_core.distributed.work import merge_in_order as merge_in_order
from opensora_core.distributed.work import rank_and_world
from opensora_core.distributed.work import shard_work as shard_work
from opensora_core.errors import InputError
from opensora_core.evaluation.samples import (
    ADHERENCE_KEYS,
    CHANCE_KEYS,
    NO_LABELS_REASON,
    eval_prompts,
    generate_samples,
    make_grid,
    read_labels,
    write_plots,
    write_samples,
)
from opensora_core.evaluation.samples import GRID_FRAMES as GRID_FRAMES
from opensora_core.evaluation.val_loss import assign_eval_buckets as assign_eval_buckets
from opensora_core.evaluation.val_loss import batch_val_loss as batch_val_loss
from opensora_core.evaluation.val_loss import noise_seed as noise_seed
from opensora_core.evaluation.val_loss import plan_val_batches as plan_val_batches
from opensora_core.evaluation.val_loss import pool_val_losses as pool_val_losses
from opensora_core.evaluation.val_loss import vae_scores, val_losses, val_rows
from opensora_core.jobs.common import job_entrypoint
from opensora_core.tracking import NullRun, flatten

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------
def evaluate(
    cfg: Config,
    model_dir: Path,
    vae_dir: Path,
    latent_stats: Path,
    shards_dir: Path,
    labels_path: Path,
    metrics_path: Path,
    report_dir: Path,
    *,
    root: Path = Path("."),
    run: NullRun | None = None,
    device: Any = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Evaluate the model of ``model_dir`` on every rank (see the module docstring).

    Rank 0 writes ``metrics_path`` and ``report_dir``, logs to ``run`` and returns the metrics;
    the other ranks return None.
    """
    import torch

    from opensora_core.evaluation.adherence import measure_clip, score_adherence
    from opensora_core.evaluation.frechet import fvd_vae, read_real_clips
    from opensora_core.inference import T2VPipeline

    ecfg = cfg.evaluate
    for path in (model_dir, vae_dir, latent_stats, shards_dir):
        if not path.exists():
            raise InputError(f"evaluate input not found: {path}")
    labels = read_labels(labels_path)
    rank, _ = rank_and_world()
    progress = progress and rank == 0
    start = time.perf_counter()
    torch.manual_seed(0)
    pipeline = T2VPipeline.from_training(model_dir, vae_dir, latent_stats, fps=ecfg.fps, device=device)

    # 1. validation loss and VAE reconstruction on held-out clips
    rows = val_rows(shards_dir, ecfg.max_val_clips)
    losses = val_losses(pipeline, rows, ecfg, root, progress)
    scores = vae_scores(pipeline, rows, root, progress)
    loss_seconds = time.perf_counter() - start

    # 2. samples at fixed seeds
    texts, prompts = eval_prompts(labels, rows, ecfg)
    seeds = [ecfg.seed + i for i in range(len(texts))]
    videos = generate_samples(pipeline, texts, seeds, ecfg, progress)
    if rank != 0:
        return None
    assert losses is not None and scores is not None and videos is not None  # rank 0 gathered them
    metrics = {**losses, **scores}

    # 3. adherence from the pixels (labelled data only), distance to the real clips (any data)
    measurements, tags = None, {}
    if prompts is not None:
        measurements = [measure_clip(v) for v in videos]
        metrics.update(score_adherence(prompts, measurements))
    else:
        tags["adherence_skipped"] = NO_LABELS_REASON.format(path=labels_path)
        log.warning("evaluate: %s", tags["adherence_skipped"])
        metrics.update({k: None for k in (*ADHERENCE_KEYS, *CHANCE_KEYS)})
        metrics["num_samples"] = len(videos)
    real = read_real_clips(rows, root)
    with torch.no_grad():
        metrics["fvd_vae"], tags["fvd_vae"] = fvd_vae(pipeline.vae, videos, real)
    metrics["fvd_vae_real_clips"] = len(real)
    if metrics["fvd_vae"] is None:
        log.warning("evaluate: %s", tags["fvd_vae"])

    # 4. reports and metrics
    write_reports(report_dir, pipeline, model_dir, ecfg, videos, texts, seeds, prompts, measurements, metrics)
    metrics = _rounded(metrics)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")

    if run is not None:
        scalars = {k: v for k, v in flatten(metrics).items() if isinstance(v, int | float)}
        seconds = time.perf_counter() - start
        run.log_metrics({**scalars, "eval_seconds": seconds, "val_loss_seconds": loss_seconds})
        run.set_tags({"evaluated_model": str(model_dir), "world_size": rank_and_world()[1], **tags})
        run.log_artifact(metrics_path)
        run.log_artifact(report_dir, "eval")
    return metrics


def write_reports(
    report_dir: Path,
    pipeline: Any,
    model_dir: Path,
    ecfg: Any,
    videos: list[Any],
    texts: list[str],
    seeds: list[int],
    prompts: list[Any] | None,
    measurements: list[Any] | None,
    metrics: dict[str, Any],
) -> None:
    """``report_dir`` afresh: the samples (mp4s (T, H, W, 3) with their prompt), ``grid.png``,
    ``adherence.csv`` (with labels) and the plots of ``metrics``."""
    from opensora_core.data.video_io import write_image
    from opensora_core.evaluation.adherence import adherence_table

    if report_dir.exists():
        shutil.rmtree(report_dir)
    report_dir.mkdir(parents=True)
    settings = {
        "model": str(model_dir),
        "num_steps": ecfg.num_steps,
        "guidance": ecfg.guidance,
        "video": f"{pipeline.video.num_frames}x{pipeline.video.height}x{pipeline.video.width}",
    }
    write_samples(videos, texts, seeds, report_dir / "samples", pipeline.video.fps, settings)
    write_image(report_dir / "grid.png", make_grid(videos))
    if prompts is not None and measurements is not None:
        adherence_table(prompts, measurements).assign(seed=seeds).to_csv(
            report_dir / "adherence.csv", index=False
        )
    write_plots(metrics, report_dir)


def _rounded(data: Any, digits: int = 6) -> Any:
    if isinstance(data, float):
        return round(data, digits)
    if isinstance(data, dict):
        return {k: _rounded(v, digits) for k, v in data.items()}
    return data


def summary(metrics: dict[str, Any]) -> str:
    """One line: val loss, VAE PSNR, fvd_vae and the adherence scores of ``metrics/eval.json``."""
    parts = [f"val_loss {metrics['val_loss']:.4f}", f"vae_psnr {metrics['vae_psnr']:.2f}"]
    if metrics.get("fvd_vae") is not None:
        parts.append(f"fvd_vae {metrics['fvd_vae']:.4g}")
    if all(metrics.get(key) is None for key in ADHERENCE_KEYS):
        parts.append("no adherence (no labels)")
    for key in ADHERENCE_KEYS:
        if metrics.get(key) is not None:
            parts.append(f"{key.removeprefix('adherence_')} {metrics[key]:.2f}")
    return ", ".join(parts) + f" over {metrics['num_samples']} samples"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a diffusion stage's final model (run under torchrun).")
    p.add_argument("--model", type=Path, required=True, help="the diffusion stage's final/ folder")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--vae", type=Path, default=Path("models/vae/final"))
    p.add_argument("--latent-stats", type=Path, default=Path("models/vae/latent_stats.json"))
    p.add_argument("--shards", type=Path, default=Path("data/shards"))
    p.add_argument(
        "--labels", type=Path, default=Path("data/raw/labels.parquet"), help="ground truth (may have no rows)"
    )
    p.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    p.add_argument("--report-dir", type=Path, default=Path("reports/eval"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


@job_entrypoint
def main() -> None:
    args = parse_args()
    # Imported after parsing: --help answers without loading torch and the models.
    from opensora_core.cli import setup_logging
    from opensora_core.config import load_config
    from opensora_core.distributed.dist import init_distributed
    from opensora_core.tracking import start_stage_run

    setup_logging(args.quiet)
    cfg = load_config(args.params, args.overrides)
    info = init_distributed()
    params = {"evaluate": vars(cfg.evaluate), "model": str(args.model)}
    with start_stage_run("evaluate", cfg.tracking, params=params, rank=info.rank) as run:
        metrics = evaluate(
            cfg,
            args.model,
            args.vae,
            args.latent_stats,
            args.shards,
            args.labels,
            args.metrics,
            args.report_dir,
            run=run,
            device=info.device,
            progress=not args.quiet,
        )
    if metrics is not None:
        print(f"evaluate job ({info.world_size} ranks): {summary(metrics)} -> {args.metrics}", flush=True)


if __name__ == "__main__":
    main()
