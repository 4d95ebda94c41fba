"""Held-out scores of a trained pipeline: the rectified-flow loss at fixed times (noise drawn per
row and time from fixed seeds; overall, per time, per bucket) and the VAE's reconstruction PSNR/SSIM
on the same clips, each split over the ranks (:mod:`opensora_core.distributed.work`)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from opensora_core.config import EvaluateConfig
from opensora_core.distributed.work import gather_to_main, merge_in_order, rank_and_world, shard_work
from opensora_core.errors import InputError


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
    from opensora_core.inference.run_config import last_stage_config

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
