"""Stage ``evaluate``: validation flow loss, VAE reconstruction, samples and prompt adherence.

1. loads the evaluated diffusion stage's ``final/`` model with the VAE and its latent statistics;
2. held-out (``val``) shard rows, each cut to its bucket of the evaluated stage: the rectified-flow
   loss at the fixed times ``evaluate.val_timesteps`` (noise drawn per row and time from fixed
   seeds), overall, per time and per bucket; the VAE's reconstruction PSNR/SSIM on the same clips
   (whole, at their own size, with the VAE stage's helper);
3. samples for prompts built from the held-out label combinations at seeds ``seed + i``, written
   to ``reports/eval/samples/`` (mp4, a ``.txt`` beside each) with a PNG grid;
4. prompt adherence measured from the samples' pixels (colour, motion, shape);
5. ``metrics/eval.json``, ``reports/eval/`` (samples, grid, per-sample table, loss plots) and
   all of it logged to MLflow.

Everything is seeded and runs in a fixed order, so two runs on CPU write the same
``metrics/eval.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config, EvaluateConfig
from opensora_core.errors import InputError
from opensora_core.tracking import NullRun, flatten, start_stage_run

DEFAULT_MODELS = Path("models")
GRID_FRAMES = 5
ADHERENCE_KEYS = ("adherence_color", "adherence_motion", "adherence_shape")


def default_stage(cfg: Config) -> str:
    """The evaluated diffusion stage: ``evaluate.stage``, else the last of ``diffusion.stages``."""
    return cfg.evaluate.stage or list(cfg.diffusion.stages)[-1]


# --------------------------------------------------------------------------------------------
# Validation loss and reconstruction
# --------------------------------------------------------------------------------------------
def val_rows(shards_dir: Path, limit: int) -> Any:
    """The held-out rows of the shards (at most ``limit``, in reader order) as a DataFrame."""
    import pandas as pd

    from opensora_core.data.shards import ShardReader

    try:
        reader = ShardReader(shards_dir, split="val")
    except InputError as exc:
        raise InputError(f"{exc} (the evaluate stage needs held-out rows)") from exc
    rows = [reader[i] for i in range(min(limit, len(reader)))]
    if not rows:
        raise InputError(f"no val rows in {shards_dir}")
    return pd.DataFrame(rows)


def assign_eval_buckets(pipeline: Any, rows: Any, batch_size: int) -> list[Any]:
    """Each row's bucket: the largest of the evaluated stage's buckets it fits (every bucket kept,
    no coins, any upscale). A row that fits none (or without a bucket config) is cut to the
    pipeline's default video shape, or to a still of that size when it is shorter.
    """
    from opensora_core.data.buckets import Bucket, Buckets, parse_bucket_config
    from opensora_core.inference import last_stage_config

    num_frames = rows["num_frames"].fillna(1).astype(int)
    assigned: list[Any] = [None] * len(rows)
    buckets_cfg = last_stage_config(pipeline.config).get("buckets")
    if buckets_cfg:
        certain: dict[str, dict[int, tuple[float, int]]] = {}
        for res, frames, _, _ in parse_bucket_config(buckets_cfg):
            certain.setdefault(res, {})[frames] = (1.0, batch_size)
        buckets = Buckets.from_config(certain, spatial_factor=pipeline.spatial_factor, max_upscale=64.0)
        assigned = buckets.assign_many(rows["height"], rows["width"], num_frames)
    v = pipeline.video
    video = Bucket(f"{v.height}x{v.width}", v.num_frames, v.height, v.width, batch_size)
    still = Bucket(f"{v.height}x{v.width}", 1, v.height, v.width, batch_size)
    return [
        b if b is not None else video if n >= v.num_frames else still for b, n in zip(assigned, num_frames)
    ]


def bucket_key(bucket: Any) -> str:
    return f"{bucket.resolution}_{bucket.num_frames}x{bucket.height}x{bucket.width}"


def noise_seed(seed: int, path: str, t_index: int) -> int:
    """A seed from the row's path and the time's index: the same noise whatever the batch."""
    digest = hashlib.sha256(f"{seed}:{path}:{t_index}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def val_losses(
    pipeline: Any, rows: Any, cfg: EvaluateConfig, root: Path, progress: bool = False
) -> dict[str, Any]:
    """Flow loss at fixed times: overall, by time and by bucket, on ``rows``."""
    import torch
    from tqdm.auto import tqdm

    from opensora_core.data.dataset import VideoDataset, collate_samples
    from opensora_core.diffusion.denoiser import predict_velocity
    from opensora_core.diffusion.rectified_flow import flow_loss, interpolate, velocity_target
    from opensora_core.diffusion.sampling import prepare_noise

    dataset = VideoDataset(rows, random_start=False, root=root)
    buckets = assign_eval_buckets(pipeline, rows, cfg.batch_size)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, bucket in enumerate(buckets):
        groups[bucket].append(i)
    sums_t = np.zeros(len(cfg.val_timesteps))
    by_bucket: dict[str, list[float]] = {}
    count = 0
    sf = pipeline.flow.sigma_min
    batches = [
        (b, idx[s : s + cfg.batch_size])
        for b, idx in sorted(groups.items())
        for s in range(0, len(idx), cfg.batch_size)
    ]
    with torch.no_grad():
        for bucket, idx in tqdm(batches, desc="val loss", disable=not progress):
            batch = collate_samples([dataset[(i, bucket)] for i in idx])
            if batch is None:
                continue
            video = batch["video"].to(pipeline.device)
            latents = pipeline.vae.encode(video).float()
            text, _ = pipeline.encode_text(batch["text"])
            b = len(batch["text"])
            losses = []
            for k, t in enumerate(cfg.val_timesteps):
                seeds = [noise_seed(cfg.seed, p, k) for p in batch["path"]]
                noise = prepare_noise(seeds, tuple(latents.shape[1:]), pipeline.device)
                tt = torch.full((b,), float(t), device=pipeline.device)
                x_t = interpolate(latents, noise, tt, sf)
                v = predict_velocity(pipeline.mmdit, x_t, tt, text)
                loss = flow_loss(v, velocity_target(latents, noise, sf))
                sums_t[k] += float(loss.sum())
                losses.append(loss)
            by_bucket.setdefault(bucket_key(bucket), []).extend(torch.stack(losses).mean(0).tolist())
            count += b
    if count == 0:
        raise InputError("no val clip could be decoded")
    by_t = sums_t / count
    return {
        "val_loss": float(by_t.mean()),
        "val_loss_by_t": {f"{t:g}": float(v) for t, v in zip(cfg.val_timesteps, by_t)},
        "val_loss_by_bucket": {k: float(np.mean(v)) for k, v in sorted(by_bucket.items())},
        "num_val_clips": count,
    }


def vae_scores(
    pipeline: Any, rows: Any, max_clips: int, root: Path, progress: bool = False
) -> dict[str, Any]:
    """The VAE's reconstruction PSNR/SSIM (and the temporal-mean baseline's PSNR) on the held-out
    clips, whole and at their own size: the VAE stage's own measurement (metrics/vae.json)."""
    from opensora_core.evaluation.reconstruction import reconstruction_metrics

    records = rows.to_dict("records")
    result = reconstruction_metrics(pipeline.vae, records, max_clips, root=root, progress=progress)
    summary = result.summary()
    return {
        "vae_psnr": summary["psnr"],
        "vae_ssim": summary["ssim"],
        "vae_psnr_baseline": summary["psnr_baseline"],
    }


# --------------------------------------------------------------------------------------------
# Samples and adherence
# --------------------------------------------------------------------------------------------
def eval_prompts(labels_path: Path, rows: Any, cfg: EvaluateConfig) -> tuple[list[str], list[Any] | None]:
    """Prompt texts and, for MovingShapes data, the attributes each asks for (else None)."""
    import pandas as pd

    from opensora_core.evaluation.adherence import build_adherence_prompts

    if labels_path.is_file():
        prompts = build_adherence_prompts(pd.read_parquet(labels_path), cfg.num_prompts, cfg.seed)
        return [p.text for p in prompts], prompts
    texts = [str(t) for t in rows["text"]]
    return [texts[i % len(texts)] for i in range(cfg.num_prompts)], None


def write_samples(
    videos: list[np.ndarray], texts: list[str], seeds: list[int], out_dir: Path, fps: float, settings: dict
) -> list[Path]:
    """Each video as ``NN_<slug>.mp4`` (PNG for stills) with a ``.txt`` of prompt, seed and settings."""
    from tasks.sample import save_output

    return [
        save_output(out_dir, i, text, seed, frames, fps, settings)
        for i, (frames, text, seed) in enumerate(zip(videos, texts, seeds))
    ]


def make_grid(videos: list[np.ndarray], frames_per_row: int = GRID_FRAMES, gap: int = 2) -> np.ndarray:
    """One row per video, ``frames_per_row`` evenly spaced frames each: (H', W', 3) uint8."""
    height = max(v.shape[1] for v in videos)
    width = max(v.shape[2] for v in videos)
    grid = np.full(
        (len(videos) * (height + gap) - gap, frames_per_row * (width + gap) - gap, 3), 255, dtype=np.uint8
    )
    for r, video in enumerate(videos):
        picks = np.linspace(0, len(video) - 1, frames_per_row).round().astype(int)
        for c, f in enumerate(picks):
            frame = video[f]
            y, x = r * (height + gap), c * (width + gap)
            grid[y : y + frame.shape[0], x : x + frame.shape[1]] = frame
    return grid


def write_plots(metrics: dict[str, Any], report_dir: Path) -> list[Path]:
    """``val_loss_by_t.csv`` (DVC plot data) and PNG bar charts of the losses and the adherence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    csv_path = report_dir / "val_loss_by_t.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["t", "val_loss"])
        for t, v in metrics["val_loss_by_t"].items():
            writer.writerow([t, f"{v:.6f}"])
    paths.append(csv_path)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    ts = list(metrics["val_loss_by_t"])
    axes[0].plot([float(t) for t in ts], list(metrics["val_loss_by_t"].values()), marker="o")
    axes[0].set(xlabel="t (1 = noise)", ylabel="flow loss", title="validation loss by time")
    attrs = [k.removeprefix("adherence_") for k in ADHERENCE_KEYS]
    scores = [metrics.get(k) or 0.0 for k in ADHERENCE_KEYS]
    chance = [metrics.get(f"chance_{a}") or 0.0 for a in attrs]
    axes[1].bar(attrs, scores, label="generated")
    axes[1].scatter(attrs, chance, color="black", marker="_", s=400, label="chance", zorder=3)
    axes[1].set(ylim=(0, 1), title="prompt adherence")
    axes[1].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    png = report_dir / "metrics.png"
    fig.savefig(png, dpi=100, metadata={"Software": None})
    plt.close(fig)
    paths.append(png)
    return paths


# --------------------------------------------------------------------------------------------
# The stage
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
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the model of ``model_dir``; writes ``metrics_path`` and ``report_dir``, returns the metrics."""
    import torch

    from opensora_core.data.video_io import write_image
    from opensora_core.diffusion.sampling import SamplingOptions
    from opensora_core.evaluation.adherence import adherence_table, measure_clip, score_adherence
    from opensora_core.inference import T2VPipeline

    ecfg = cfg.evaluate
    for path in (model_dir, vae_dir, latent_stats, shards_dir):
        if not path.exists():
            raise InputError(f"evaluate input not found: {path}")
    start = time.perf_counter()
    torch.manual_seed(0)
    pipeline = T2VPipeline.from_training(model_dir, vae_dir, latent_stats, fps=ecfg.fps)

    # 1. validation loss and VAE reconstruction on held-out clips
    rows = val_rows(shards_dir, ecfg.max_val_clips)
    metrics = val_losses(pipeline, rows, ecfg, root, progress)
    metrics.update(vae_scores(pipeline, rows, ecfg.max_val_clips, root, progress))
    loss_seconds = time.perf_counter() - start

    # 2. samples at fixed seeds
    texts, prompts = eval_prompts(labels_path, rows, ecfg)
    seeds = [ecfg.seed + i for i in range(len(texts))]
    options = SamplingOptions(num_steps=ecfg.num_steps, guidance=ecfg.guidance, progress=False)
    videos = pipeline.generate(texts, seeds, options, batch_size=ecfg.batch_size, progress=progress)

    # 3. adherence from the pixels
    if prompts is not None:
        measurements = [measure_clip(v) for v in videos]
        metrics.update(score_adherence(prompts, measurements))
    else:
        metrics.update({k: None for k in (*ADHERENCE_KEYS, "chance_color", "chance_motion", "chance_shape")})
        metrics["num_samples"] = len(videos)

    # 4. reports and metrics
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
    if prompts is not None:
        adherence_table(prompts, measurements).assign(seed=seeds).to_csv(
            report_dir / "adherence.csv", index=False
        )
    write_plots(metrics, report_dir)
    metrics = _rounded(metrics)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")

    seconds = time.perf_counter() - start
    if run is not None:
        scalars = {k: v for k, v in flatten(metrics).items() if isinstance(v, int | float)}
        run.log_metrics({**scalars, "eval_seconds": seconds, "val_loss_seconds": loss_seconds})
        run.set_tags({"evaluated_model": str(model_dir)})
        run.log_artifact(metrics_path)
        run.log_artifact(report_dir, "eval")
    metrics["_seconds"] = seconds
    return metrics


def _rounded(data: Any, digits: int = 6) -> Any:
    if isinstance(data, float):
        return round(data, digits)
    if isinstance(data, dict):
        return {k: _rounded(v, digits) for k, v in data.items()}
    return data


def summary(metrics: dict[str, Any]) -> str:
    parts = [f"val_loss {metrics['val_loss']:.4f}", f"vae_psnr {metrics['vae_psnr']:.2f}"]
    for key in ADHERENCE_KEYS:
        if metrics.get(key) is not None:
            parts.append(f"{key.removeprefix('adherence_')} {metrics[key]:.2f}")
    return ", ".join(parts) + f" over {metrics['num_samples']} samples ({metrics['_seconds']:.1f}s)"


def stage(args: argparse.Namespace, cfg: Config) -> str:
    name = args.stage or default_stage(cfg)
    model_dir = Path(args.model) if args.model else DEFAULT_MODELS / "diffusion" / name / "final"
    params = {"evaluate": vars(cfg.evaluate), "model": str(model_dir)}
    with start_stage_run("evaluate", cfg.tracking, params=params) as run:
        metrics = evaluate(
            cfg,
            model_dir,
            Path(args.vae),
            Path(args.latent_stats),
            Path(args.shards),
            Path(args.labels),
            Path(args.metrics),
            Path(args.report_dir),
            run=run,
            progress=not args.quiet,
        )
    return summary(metrics)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "Evaluate the last diffusion stage: val loss, VAE reconstruction, samples, prompt adherence.",
        prog="evaluate",
    )
    parser.add_argument(
        "--stage", default="", help="diffusion stage to evaluate (default: evaluate.stage or the last)"
    )
    parser.add_argument("--model", default="", help="a diffusion final/ folder (overrides --stage)")
    parser.add_argument("--vae", default="models/vae/final", help="the VAE's final/ folder")
    parser.add_argument("--latent-stats", default="models/vae/latent_stats.json")
    parser.add_argument("--shards", default="data/shards", help="shard folder (its val rows are used)")
    parser.add_argument("--labels", default="data/raw/labels.parquet", help="MovingShapes ground truth")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--report-dir", default="reports/eval")
    return run_cli(parser, argv, stage)


if __name__ == "__main__":
    sys.exit(main())
