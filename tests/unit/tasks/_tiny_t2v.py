"""Tiny trained-model folders in the training stages' layout, for inference, evaluate and register tests.

Writes under ``root``::

    models/vae/final/model.safetensors + model.json      (VideoAutoencoder.save)
    models/vae/latent_stats.json                         (with the weights' vae_sha256)
    models/diffusion/<stage>/final/                     model.safetensors, ema.safetensors,
                                                         mmdit_config.json, config.json, text_encoder.json

The MMDiT gets small random weights everywhere (its default init predicts zero velocity), so
samples depend on the prompt, the seed and the reference. :func:`write_eval_project` adds the
data the evaluate stage reads: MovingShapes clips (``data/raw/``) and their shards (``data/shards/``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from opensora_core.config import Config, IngestConfig, ShardConfig
from opensora_core.data.shards import write_shards
from opensora_core.data.video_io import file_sha256
from opensora_core.models.mmdit.model import build_mmdit
from opensora_core.models.text.encoders import TextEncoderConfig
from opensora_core.models.vae.model import VaeModelConfig, build_vae

BUCKETS = {"32px": {9: [1.0, 2], 1: [1.0, 4]}}


def write_tiny_models(
    root: Path, stage: str = "stage1", seed: int = 0, scale: float = 0.05
) -> dict[str, Path]:
    """Write the folders; returns the paths ``vae``, ``latent_stats`` and ``diffusion``."""
    torch.manual_seed(seed)
    vae_dir = root / "models" / "vae" / "final"
    vae = build_vae(VaeModelConfig())
    vae.save(vae_dir, "model")
    stats = root / "models" / "vae" / "latent_stats.json"
    channels = vae.latent_channels
    stats.write_text(
        json.dumps(
            {
                "mean": [0.0] * channels,
                "std": [1.0] * channels,
                "scale": 1.0,
                "shift": 0.0,
                "vae_sha256": file_sha256(vae_dir / "model.safetensors"),  # as vae_stats writes it
            }
        )
    )

    final = root / "models" / "diffusion" / stage / "final"
    final.mkdir(parents=True)
    model = build_mmdit("tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(final / "ema.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(final / "model.safetensors"))
    (final / "mmdit_config.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    (final / "text_encoder.json").write_text(json.dumps(dataclasses.asdict(TextEncoderConfig())))
    config = Config().to_dict()
    config["diffusion"]["stages"] = {stage: {"steps": 1, "lr": 1e-4, "buckets": BUCKETS}}
    (final / "config.json").write_text(json.dumps(config))
    return {"vae": vae_dir, "latent_stats": stats, "diffusion": final}


def write_eval_project(root: Path) -> dict[str, Path]:
    """A project folder the evaluate stage runs in: 16 clips and 2 stills (2 held-out label
    combinations), shards of 8 rows, and the tiny models of :func:`write_tiny_models`."""
    import pandas as pd

    from tasks.ingest import ingest

    ingest(
        IngestConfig(num_clips=16, num_stills=2, val_combos=2, num_frames=[9]),
        root / "data/raw",
        root,
        progress=False,
    )
    labels = pd.read_parquet(root / "data/raw/labels.parquet")
    table = labels[["path", "text", "split", "num_frames", "height", "width", "fps"]]
    write_shards(table, root / "data/shards", ShardConfig(rows_per_shard=8), source="labels", progress=False)
    return write_tiny_models(root)
