"""Evaluation samples: the prompts (from the held-out label combinations when the data has labels,
else the held-out captions), the samples at fixed seeds split over the ranks, and what is written
of them (mp4s with their prompt, the frame grid, the loss and adherence plots)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from opensora_core.config import EvaluateConfig
from opensora_core.distributed.work import gather_to_main, merge_in_order, rank_and_world, shard_work
from opensora_core.errors import InputError

GRID_FRAMES = 5
ADHERENCE_KEYS = ("adherence_color", "adherence_motion", "adherence_shape")
CHANCE_KEYS = ("chance_color", "chance_motion", "chance_shape")


NO_LABELS_REASON = (
    "{path} has no rows: the data has no ground truth (a folder or CSV source), so prompt "
    "adherence is not measured and adherence_*/chance_* are null"
)


def read_labels(labels_path: Path) -> Any:
    """The ingest stage's ``labels.parquet`` (no rows for data without ground truth); InputError
    naming the file when it is missing or unreadable."""
    import pandas as pd

    if not labels_path.is_file():
        raise InputError(
            f"labels table {labels_path} not found (the ingest stage writes it for every source; "
            "run it first, or pass --labels)"
        )
    try:
        return pd.read_parquet(labels_path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise InputError(f"cannot read labels table {labels_path}: {exc}") from exc


def eval_prompts(labels: Any, rows: Any, cfg: EvaluateConfig) -> tuple[list[str], list[Any] | None]:
    """Prompt texts and, for labelled (MovingShapes) data, the attributes each asks for.

    ``labels`` without rows (user data): the held-out rows' own captions in turn, and None.
    """
    from opensora_core.evaluation.adherence import build_adherence_prompts

    if not labels.empty:
        prompts = build_adherence_prompts(labels, cfg.num_prompts, cfg.seed, split=cfg.adherence_split)
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
    measured = any(metrics.get(k) is not None for k in ADHERENCE_KEYS)
    axes[1].set(ylim=(0, 1), title="prompt adherence" if measured else "prompt adherence: no labels")
    axes[1].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    png = report_dir / "metrics.png"
    fig.savefig(png, dpi=100, metadata={"Software": None})
    plt.close(fig)
    paths.append(png)
    return paths
