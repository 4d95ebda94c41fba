"""Job: the evaluate stage's work, on every rank of a torchrun launch (``tasks.evaluate`` starts it).

    torchrun --standalone --nproc-per-node N -m opensora_core.jobs.evaluate --model DIR \\
        [--params P] [--set section.key=value ...] [--vae DIR] [--latent-stats JSON] [--shards DIR] \\
        [--labels PARQUET] [--metrics JSON] [--report-dir DIR] [--quiet]

1. loads the evaluated diffusion stage's ``final/`` model with the VAE and its latent statistics;
2. held-out (``val``) shard rows, each cut to its bucket of the evaluated stage: the rectified-flow
   loss at the fixed times ``evaluate.val_timesteps`` (noise drawn per row and time from fixed
   seeds), overall, per time and per bucket; the VAE's reconstruction PSNR/SSIM on the same clips
   (whole, at their own size, with the VAE stage's helpers);
3. samples for prompts built from the held-out label combinations at seeds ``seed + i``;
4. prompt adherence measured from the samples' pixels (colour, motion, shape);
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
import csv
import dataclasses
import hashlib
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from opensora_core.config import Config, EvaluateConfig
from opensora_core.errors import InputError
from opensora_core.jobs.common import job_entrypoint
from opensora_core.tracking import NullRun, flatten

GRID_FRAMES = 5
ADHERENCE_KEYS = ("adherence_color", "adherence_motion", "adherence_shape")
CHANCE_KEYS = ("chance_color", "chance_motion", "chance_shape")


# --------------------------------------------------------------------------------------------
# Splitting work over ranks
# --------------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_work(items: list[Any], rank: int, world: int) -> list[tuple[int, Any]]:
    """``(j, item)`` of the items this rank takes: those with ``j % world == rank``."""
    return [(j, item) for j, item in enumerate(items) if j % world == rank]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's picklable ``obj`` on rank 0, in rank order; None on the other ranks."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def merge_in_order(parts: list[list[tuple[int, Any]]]) -> list[Any]:
    """The ``(j, result)`` pairs of every rank as one list ordered by ``j``."""
    return [result for _, result in sorted((pair for part in parts for pair in part), key=lambda p: p[0])]


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


def plan_val_batches(pipeline: Any, rows: Any, batch_size: int) -> list[tuple[Any, list[int]]]:
    """``(bucket, row indices)`` of every val batch: rows grouped by bucket (sorted), ``batch_size`` at a time."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, bucket in enumerate(assign_eval_buckets(pipeline, rows, batch_size)):
        groups[bucket].append(i)
    return [
        (bucket, idx[s : s + batch_size])
        for bucket, idx in sorted(groups.items())
        for s in range(0, len(idx), batch_size)
    ]


def batch_val_loss(
    pipeline: Any, dataset: Any, bucket: Any, idx: list[int], cfg: EvaluateConfig
) -> Any | None:
    """Flow loss ``(B, K)`` float32 on the CPU of the batch's clips that decode, one column per time
    of ``cfg.val_timesteps``; None when none decodes."""
    import torch

    from opensora_core.data.dataset import collate_samples
    from opensora_core.diffusion.denoiser import predict_velocity
    from opensora_core.diffusion.rectified_flow import flow_loss, interpolate, velocity_target
    from opensora_core.diffusion.sampling import prepare_noise

    batch = collate_samples([dataset[(i, bucket)] for i in idx])
    if batch is None:
        return None
    device, sf = pipeline.device, pipeline.flow.sigma_min
    latents = pipeline.vae.encode(batch["video"].to(device)).float()
    text, _ = pipeline.encode_text(batch["text"])
    b = len(batch["text"])
    losses = []
    for k, t in enumerate(cfg.val_timesteps):
        seeds = [noise_seed(cfg.seed, p, k) for p in batch["path"]]
        noise = prepare_noise(seeds, tuple(latents.shape[1:]), device)
        tt = torch.full((b,), float(t), device=device)
        x_t = interpolate(latents, noise, tt, sf)
        v = predict_velocity(pipeline.mmdit, x_t, tt, text)
        losses.append(flow_loss(v, velocity_target(latents, noise, sf)))
    return torch.stack(losses, dim=1).float().cpu()


def pool_val_losses(batch_losses: list[tuple[str, Any | None]], timesteps: list[float]) -> dict[str, Any]:
    """Overall, per-time and per-bucket loss from ``(bucket key, (B, K) losses or None)`` in batch order.

    A pooled sum over every clip (float64, in batch order) divided by the number of clips.
    """
    sums_t = np.zeros(len(timesteps))
    by_bucket: dict[str, list[float]] = {}
    count = 0
    for key, loss in batch_losses:
        if loss is None:
            continue
        values = loss.double().numpy()
        sums_t += values.sum(axis=0)
        by_bucket.setdefault(key, []).extend(values.mean(axis=1).tolist())
        count += len(values)
    if count == 0:
        raise InputError("no val clip could be decoded")
    by_t = sums_t / count
    return {
        "val_loss": float(by_t.mean()),
        "val_loss_by_t": {f"{t:g}": float(v) for t, v in zip(timesteps, by_t)},
        "val_loss_by_bucket": {k: float(np.mean(v)) for k, v in sorted(by_bucket.items())},
        "num_val_clips": count,
    }


def val_losses(
    pipeline: Any, rows: Any, cfg: EvaluateConfig, root: Path, progress: bool = False
) -> dict[str, Any] | None:
    """Flow loss at fixed times on ``rows``, this rank's batches; the pooled result on rank 0 (else None)."""
    import torch
    from tqdm.auto import tqdm

    from opensora_core.data.dataset import VideoDataset

    rank, world = rank_and_world()
    dataset = VideoDataset(rows, random_start=False, root=root)
    mine = shard_work(plan_val_batches(pipeline, rows, cfg.batch_size), rank, world)
    results = []
    with torch.no_grad():
        for j, (bucket, idx) in tqdm(mine, desc="val loss", disable=not progress):
            results.append((j, (bucket_key(bucket), batch_val_loss(pipeline, dataset, bucket, idx, cfg))))
    parts = gather_to_main(results)
    return None if parts is None else pool_val_losses(merge_in_order(parts), cfg.val_timesteps)


def vae_scores(pipeline: Any, rows: Any, root: Path, progress: bool = False) -> dict[str, Any] | None:
    """The VAE's reconstruction PSNR/SSIM (and the temporal-mean baseline's PSNR) on the held-out
    video clips, whole and at their own size: the VAE stage's own measurement (metrics/vae.json).

    Rank r reconstructs the rows ``j % world == r`` one clip at a time; rank 0 pools the per-clip
    errors in row order and returns the scores (None on the other ranks).
    """
    import torch
    from tqdm.auto import tqdm

    from opensora_core.evaluation.reconstruction import ReconstructionResult, iter_clips, reconstruct

    vae = pipeline.vae
    rank, world = rank_and_world()
    results = []
    with torch.no_grad():
        for j, row in tqdm(
            shard_work(rows.to_dict("records"), rank, world), desc="reconstruct", disable=not progress
        ):
            result = ReconstructionResult()  # empty for a still: iter_clips skips it
            for name, clip in iter_clips([row], vae.spatial_factor, vae.temporal_factor, root=root):
                result.add(name, clip, reconstruct(vae, clip).cpu())
            results.append((j, result))
    parts = gather_to_main(results)
    if parts is None:
        return None
    pooled = ReconstructionResult()
    for result in merge_in_order(parts):
        for f in dataclasses.fields(ReconstructionResult):
            getattr(pooled, f.name).extend(getattr(result, f.name))
    summary = pooled.summary()
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
        prompts = build_adherence_prompts(
            pd.read_parquet(labels_path), cfg.num_prompts, cfg.seed, split=cfg.adherence_split
        )
        return [p.text for p in prompts], prompts
    texts = [str(t) for t in rows["text"]]
    return [texts[i % len(texts)] for i in range(cfg.num_prompts)], None


def generate_samples(
    pipeline: Any, texts: list[str], seeds: list[int], cfg: EvaluateConfig, progress: bool = False
) -> list[np.ndarray] | None:
    """Sample i of ``texts`` at ``seeds[i]``; this rank's batches, all of them in order on rank 0 (else None).

    Batches are ``cfg.batch_size`` consecutive prompts, each one sampler call whatever the world size.
    """
    from tqdm.auto import tqdm

    from opensora_core.diffusion.sampling import SamplingOptions

    options = SamplingOptions(num_steps=cfg.num_steps, guidance=cfg.guidance, progress=False)
    batches = [
        list(range(s, min(s + cfg.batch_size, len(texts)))) for s in range(0, len(texts), cfg.batch_size)
    ]
    rank, world = rank_and_world()
    results = []
    for j, idx in tqdm(shard_work(batches, rank, world), desc="samples", disable=not progress):
        videos = pipeline.generate(
            [texts[i] for i in idx], [seeds[i] for i in idx], options, batch_size=len(idx)
        )
        results.append((j, videos))
    parts = gather_to_main(results)
    return None if parts is None else [v for videos in merge_in_order(parts) for v in videos]


def write_samples(
    videos: list[np.ndarray], texts: list[str], seeds: list[int], out_dir: Path, fps: float, settings: dict
) -> list[Path]:
    """Each video as ``NNNN_<slug>.mp4`` (PNG for stills) with a ``.txt`` of prompt, seed and settings."""
    # The sample CLI's writer: evaluation samples are named and described like users' samples.
    from opensora_core.outputs import save_output

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

    from opensora_core.data.video_io import write_image
    from opensora_core.evaluation.adherence import adherence_table, measure_clip, score_adherence
    from opensora_core.inference import T2VPipeline

    ecfg = cfg.evaluate
    for path in (model_dir, vae_dir, latent_stats, shards_dir):
        if not path.exists():
            raise InputError(f"evaluate input not found: {path}")
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
    texts, prompts = eval_prompts(labels_path, rows, ecfg)
    seeds = [ecfg.seed + i for i in range(len(texts))]
    videos = generate_samples(pipeline, texts, seeds, ecfg, progress)
    if rank != 0:
        return None
    assert losses is not None and scores is not None and videos is not None  # rank 0 gathered them
    metrics = {**losses, **scores}

    # 3. adherence from the pixels
    if prompts is not None:
        measurements = [measure_clip(v) for v in videos]
        metrics.update(score_adherence(prompts, measurements))
    else:
        metrics.update({k: None for k in (*ADHERENCE_KEYS, *CHANCE_KEYS)})
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

    if run is not None:
        scalars = {k: v for k, v in flatten(metrics).items() if isinstance(v, int | float)}
        seconds = time.perf_counter() - start
        run.log_metrics({**scalars, "eval_seconds": seconds, "val_loss_seconds": loss_seconds})
        run.set_tags({"evaluated_model": str(model_dir), "world_size": rank_and_world()[1]})
        run.log_artifact(metrics_path)
        run.log_artifact(report_dir, "eval")
    return metrics


def _rounded(data: Any, digits: int = 6) -> Any:
    if isinstance(data, float):
        return round(data, digits)
    if isinstance(data, dict):
        return {k: _rounded(v, digits) for k, v in data.items()}
    return data


def summary(metrics: dict[str, Any]) -> str:
    """One line: val loss, VAE PSNR and the adherence scores of ``metrics/eval.json``."""
    parts = [f"val_loss {metrics['val_loss']:.4f}", f"vae_psnr {metrics['vae_psnr']:.2f}"]
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
    p.add_argument("--labels", type=Path, default=Path("data/raw/labels.parquet"))
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
