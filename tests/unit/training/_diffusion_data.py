"""A tiny project for the diffusion training tests: real clips, shards, a VAE and its statistics.

``make_diffusion_inputs(root)`` writes under ``root``::

    raw/clips/*.mp4, raw/stills/*.png    MovingShapes clips (9 frames, 32x32, PyAV) and stills
    shards/                              parquet shards + manifest (absolute clip paths)
    vae/model.safetensors + model.json   a tiny Wan VAE (VideoAutoencoder.save)
    latent_stats.json                    per-channel mean/std measured on the clips, vae_sha256

``tiny_config(root)`` is a Config with one micro stage on those inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from opensora_core.config import ConditionConfig, Config, DiffusionStageConfig, IngestConfig, ShardConfig
from opensora_core.data.shards import file_sha256, write_shards
from opensora_core.data.synthetic import plan_samples, write_sample
from opensora_core.models.vae.model import VaeModelConfig, build_vae
from opensora_core.training.diffusion_trainer import StagePaths

BUCKETS = {"32px": {9: [1.0, 2], 1: [1.0, 4]}}


@dataclass
class DiffusionInputs:
    root: Path
    paths: StagePaths
    vae_sha256: str
    shards_hash: str


def make_diffusion_inputs(
    root: Path, num_clips: int = 10, num_stills: int = 4, seed: int = 0
) -> DiffusionInputs:
    root = Path(root)
    ingest = IngestConfig(
        num_clips=num_clips,
        num_stills=num_stills,
        sizes=[[32, 32]],
        num_frames=[9],
        fps=[8],
        val_combos=1,
        seed=seed,
    )
    rows = []
    for sample in plan_samples(ingest):
        path = write_sample(sample, root / "raw")
        frames = 1 if sample.kind == "still" else sample.num_frames
        rows.append(
            {
                "path": str(path),
                "text": sample.text,
                "split": sample.split,
                "num_frames": frames,
                "height": sample.height,
                "width": sample.width,
                "fps": sample.fps or None,
            }
        )
    manifest = write_shards(
        pd.DataFrame(rows), root / "shards", ShardConfig(rows_per_shard=6), progress=False
    )

    torch.manual_seed(seed)
    vae = build_vae(VaeModelConfig())
    weights = vae.save(root / "vae", "model")
    channels = vae.latent_channels
    # Statistics of the random VAE's latents on these clips' first frames, so latents are ~N(0, 1).
    from opensora_core.data.dataset import prepare_video
    from opensora_core.data.decoding import decode_frames

    with torch.no_grad():
        zs = [
            vae.encode_raw(prepare_video(decode_frames(Path(r["path"])), 32, 32)[None]).flatten(2)
            for r in rows[:6]
        ]
    z = torch.cat(zs, dim=2)
    stats = {
        "mean": z.mean(dim=(0, 2)).tolist(),
        "std": z.std(dim=(0, 2)).clamp(min=1e-3).tolist(),
        "scale": 1.0,
        "shift": 0.0,
        "num_samples": len(zs),
        "vae_sha256": file_sha256(weights),
    }
    assert len(stats["mean"]) == channels
    (root / "latent_stats.json").write_text(json.dumps(stats))
    paths = StagePaths(
        shards=root / "shards",
        vae=root / "vae",
        latent_stats=root / "latent_stats.json",
        models=root / "models",
        metrics=root / "metrics",
    )
    return DiffusionInputs(root, paths, stats["vae_sha256"], manifest["content_hash"])


def tiny_config(cache_dir: Path, steps: int = 6, **diffusion: object) -> Config:
    """Defaults with tracking off, one stage ``stage1`` of ``steps`` micro steps, the cache in ``cache_dir``."""
    cfg = Config()
    cfg.tracking.enabled = False
    stage = DiffusionStageConfig(
        steps=steps, lr=1e-3, warmup_steps=2, buckets=BUCKETS, conditions=ConditionConfig({"t2v": 1.0})
    )
    cfg.diffusion.stages = {"stage1": stage}
    cfg.diffusion.cache_dir = str(cache_dir)
    cfg.diffusion.log_every = 1
    cfg.diffusion.ckpt_every = 3
    cfg.diffusion.num_samples = 2
    cfg.diffusion.sample_num_steps = 2
    for key, value in diffusion.items():
        setattr(cfg.diffusion, key, value)
    return cfg
