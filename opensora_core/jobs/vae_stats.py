"""Job: exact per-channel mean and standard deviation of the VAE's raw latents, across ranks.

    torchrun --standalone --nproc-per-node N -m opensora_core.jobs.vae_stats [--params P] [--set k=v]

The clips are the first ``vae_stats.num_samples`` train rows in a seeded order, each at the shape
its bucket assigns; rank r encodes every world_size-th of them, so the set of clips does not
depend on the number of ranks. Each rank keeps per-channel (count, mean, M2) merged batch by batch
with Chan's parallel update; ranks are merged exactly in float64 with two all_reduces (global
mean, then M2 about it), so 2 ranks give the statistics of 1 rank. Rank 0 writes
``models/vae/latent_stats.json``: ``mean`` and ``std`` (one value per latent channel), ``scale`` and
``shift`` (1 and 0: encode() normalises per channel, leaving nothing to rescale), ``num_samples``
(clips) and ``vae_sha256`` (of the weights the statistics belong to).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import torch

from opensora_core.jobs.common import job_entrypoint


def batch_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (count, mean, M2) of latents (B, C, T, H, W), in float64; M2 = sum of squared deviations."""
    flat = z.double().transpose(0, 1).reshape(z.shape[1], -1)
    n = torch.full((flat.shape[0],), float(flat.shape[1]), dtype=torch.float64)
    mean = flat.mean(1)
    m2 = (flat - mean[:, None]).pow(2).sum(1)
    return n, mean, m2


def merge_moments(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel merge of two (count, mean, M2) triples."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    delta = mb - ma
    safe = n.clamp_min(1)
    return n, ma + delta * nb / safe, m2a + m2b + delta.pow(2) * na * nb / safe


def all_reduce_moments(
    n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every rank's triple exactly: global mean from sum(n * mean), then M2 about it."""
    from opensora_core.distributed.dist import all_reduce_sum

    total = all_reduce_sum(torch.stack([n, n * mean]).to(device)).cpu()
    n_all = total[0]
    mean_all = total[1] / n_all.clamp_min(1)
    m2_all = all_reduce_sum((m2 + n * (mean - mean_all).pow(2)).to(device)).cpu()
    return n_all, mean_all, m2_all


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Latent statistics of the trained VAE (run under torchrun).")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--shards", type=Path, default=Path("data/shards"))
    p.add_argument("--vae", type=Path, default=Path("models/vae/final"))
    p.add_argument("--output", type=Path, default=Path("models/vae/latent_stats.json"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def accumulate_moments(
    vae: torch.nn.Module, shards: Path, cfg: Any, info: Any, progress: bool = True
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], int, int]:
    """This rank's share of the clips -> per-channel (count, mean, M2) of their raw latents (C,) each,
    with the numbers of clips encoded and skipped (no bucket fits).

    The clip list is the same whatever the world size (``cfg.seed``, ``cfg.num_samples``); rank r
    takes every world_size-th clip from position r.
    """
    import numpy as np
    from tqdm import tqdm

    from opensora_core.data.buckets import BucketOptions, Buckets
    from opensora_core.data.dataset import VideoDataset
    from opensora_core.data.shards import ShardReader

    reader = ShardReader(shards, split="train")
    order = np.random.default_rng(cfg.seed).permutation(len(reader))[: cfg.num_samples]
    sizes = reader.columns(["height", "width", "num_frames"])
    buckets = Buckets(BucketOptions(cfg.buckets, spatial_factor=vae.spatial_factor))
    dataset = VideoDataset(reader, 1, random_start=False, seed=cfg.seed)
    mine = order[info.rank :: info.world_size]
    c = vae.latent_channels
    acc = (
        torch.zeros(c, dtype=torch.float64),
        torch.zeros(c, dtype=torch.float64),
        torch.zeros(c, dtype=torch.float64),
    )
    skipped = 0
    with torch.no_grad():
        for index in tqdm(mine, desc="vae_stats", disable=info.rank != 0 or not progress, unit="clip"):
            row = sizes.iloc[int(index)]
            bucket = buckets.assign(
                int(index), int(row.height), int(row.width), int(row.num_frames), cfg.seed, 0
            )
            sample = dataset[(int(index), bucket)] if bucket is not None else None
            if sample is None:
                skipped += 1
                continue
            z = vae.encode_raw(sample["video"][None].to(info.device))
            acc = merge_moments(acc, batch_moments(z.cpu()))
    return acc, len(mine) - skipped, skipped


def write_stats(
    args: argparse.Namespace,
    cfg: Any,
    tracking: Any,
    weights: Path,
    moments: tuple,
    clips: float,
    skipped: float,
) -> None:
    """Rank 0: ``latent_stats.json`` from the merged moments (count, mean, M2) and its MLflow run."""
    import json

    from opensora_core.tracking import start_stage_run

    n, mean, m2 = moments
    std = (m2 / n.clamp_min(1)).sqrt()
    stats = {
        "mean": [round(float(v), 8) for v in mean],
        "std": [round(float(v), 8) for v in std],
        "scale": 1.0,
        "shift": 0.0,
        "num_samples": int(clips),
        "num_skipped": int(skipped),
        "num_values_per_channel": int(n[0]),
        "vae_sha256": sha256_file(weights),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(stats, indent=2) + "\n")
    with start_stage_run("vae_stats", tracking, params={"vae_stats": vars(cfg)}) as run:
        run.log_metrics(
            {
                "num_samples": clips,
                "mean_abs_mean": float(mean.abs().mean()),
                "mean_std": float(std.mean()),
            }
        )
        run.log_artifact(args.output)
    print(
        f"vae_stats: {int(clips)} clips ({int(skipped)} skipped), {len(mean)} channels, "
        f"std {float(std.min()):.3f}..{float(std.max()):.3f} -> {args.output}",
        flush=True,
    )


@job_entrypoint
def main() -> None:
    args = parse_args()
    from opensora_core.cli import setup_logging
    from opensora_core.config import load_config
    from opensora_core.distributed.dist import all_reduce_sum, init_distributed
    from opensora_core.models.final import load_vae_final

    setup_logging()
    config = load_config(args.params, args.overrides)
    cfg, tracking = config.vae_stats, config.tracking
    info = init_distributed()
    vae = load_vae_final(args.vae).to(info.device).requires_grad_(False)
    weights = args.vae / (
        "ema.safetensors" if (args.vae / "ema.safetensors").is_file() else "model.safetensors"
    )
    # 1. this rank's clips -> per-channel moments of their raw latents
    acc, encoded, skipped = accumulate_moments(vae, args.shards, cfg, info, progress=not args.quiet)
    # 2. exact merge across ranks; rank 0 writes the file
    moments = all_reduce_moments(*acc, info.device)
    counts = torch.tensor([float(encoded), float(skipped)], dtype=torch.float64)
    clips, skipped_all = all_reduce_sum(counts.to(info.device)).cpu().tolist()
    if info.rank == 0:
        write_stats(args, cfg, tracking, weights, moments, clips, skipped_all)


if __name__ == "__main__":
    main()
