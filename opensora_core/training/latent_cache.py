"""Latent and text-embedding cache of the diffusion stages: each clip is VAE-encoded once.

On CPU the frozen VAE costs more than the tiny MMDiT's training step, so the latents of every
(sample, bucket shape) the sampler asks for are stored on first use and read back by every later
step, stage and rerun. One cache folder per key::

    <root>/<key>/                         key = sha256(VAE sha256, text encoder name, shard content hash)[:16]
        cache.json                        what the key stands for
        latents/<index>/<T>x<H>x<W>-i<interval>.safetensors
                                          raw latents (C, T', H', W') float32, path and text in metadata
        text/                             per-prompt text embeddings (TextEmbeddingCache)

What makes an entry reusable:

- raw latents (the posterior mean, before the latent statistics) are stored, so new statistics
  (``models/vae/latent_stats.json``) do not invalidate the cache; a new VAE, encoder or data set does;
- the clip window is centred (:class:`~opensora_core.data.dataset.VideoDataset` with
  ``random_start=False``), so an entry is a function of (sample, bucket shape, frame interval);
- a sample index is a row of the shard reader, stable for one shard content hash.

Filling is distributed-safe: every rank encodes the samples of its own batches, and every file is
written to a unique temporary name and renamed into place, so concurrent writers of the same
entry (identical content) never expose a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Sampler

from opensora_core.data.buckets import Bucket
from opensora_core.data.dataset import VideoDataset

FORMAT = "opensora-latent-cache/1"


def cache_key(vae_sha256: str, text_encoder: str, shards_hash: str) -> str:
    """The cache folder name for a VAE (weights sha256), a text encoder (its name) and a shard set."""
    blob = json.dumps([FORMAT, vae_sha256, text_encoder, shards_hash])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class LatentCache:
    """Raw VAE latents per (sample index, bucket shape, frame interval), under one key's folder.

    ``hits`` / ``misses`` count :meth:`get` results (for the logs and the tests).
    """

    def __init__(self, root: str | Path, vae_sha256: str, text_encoder: str, shards_hash: str) -> None:
        if not (vae_sha256 and text_encoder and shards_hash):
            raise ValueError("a latent cache needs the VAE sha256, the text encoder name and the shard hash")
        self.key = cache_key(vae_sha256, text_encoder, shards_hash)
        self.dir = Path(root) / self.key
        self.identity = {
            "format": FORMAT,
            "vae_sha256": vae_sha256,
            "text_encoder": text_encoder,
            "shards_hash": shards_hash,
        }
        self.hits = 0
        self.misses = 0

    @property
    def text_dir(self) -> Path:
        """Folder for the text-embedding cache of the same key."""
        return self.dir / "text"

    def path_for(self, index: int, shape: Sequence[int], frame_interval: int = 1) -> Path:
        """File of sample ``index`` cut to ``shape`` = (T, H, W) pixels every ``frame_interval`` frames."""
        t, h, w = (int(v) for v in shape)
        return self.dir / "latents" / f"{int(index):07d}" / f"{t}x{h}x{w}-i{int(frame_interval)}.safetensors"

    def get(self, index: int, shape: Sequence[int], frame_interval: int = 1) -> dict[str, Any] | None:
        """``{"latents": (C, T', H', W') float32, "path", "text"}`` of a cached entry, or None."""
        path = self.path_for(index, shape, frame_interval)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                latents = f.get_tensor("latents")
        except (OSError, SafetensorError):
            self.misses += 1
            return None
        self.hits += 1
        return {"latents": latents, "path": meta.get("path", ""), "text": meta.get("text", "")}

    def put(
        self,
        index: int,
        shape: Sequence[int],
        latents: torch.Tensor,
        *,
        path: str = "",
        text: str = "",
        frame_interval: int = 1,
    ) -> Path:
        """Store ``latents`` (C, T', H', W') as float32 for the entry; returns its file."""
        target = self.path_for(index, shape, frame_interval)
        target.parent.mkdir(parents=True, exist_ok=True)
        info = self.dir / "cache.json"
        if not info.is_file():
            _atomic_write_text(info, json.dumps(self.identity, indent=2) + "\n")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        tensor = latents.detach().to(device="cpu", dtype=torch.float32).contiguous()
        save_file({"latents": tensor}, str(tmp), metadata={"path": path, "text": text})
        os.replace(tmp, target)
        return target


class LatentDataset(Dataset):
    """Training samples keyed by ``(index, bucket)``: cached latents when present, else the clip.

    Items are ``{"index", "bucket", "text", "path"}`` plus either ``"latents"`` (C, T', H', W')
    from the cache or ``"video"`` (3, T, H, W) in [-1, 1] to encode (None when the clip fails to
    decode; the collate function drops it). Without a cache every item is a clip.
    """

    def __init__(self, videos: VideoDataset, cache: LatentCache | None = None) -> None:
        if cache is not None and videos.random_start:
            raise ValueError("a latent cache needs centred clip windows (VideoDataset(random_start=False))")
        self.videos = videos
        self.cache = cache

    def __len__(self) -> int:
        return len(self.videos)

    def set_epoch(self, epoch: int) -> None:
        self.videos.set_epoch(epoch)

    def __getitem__(self, key: tuple[int, Bucket]) -> dict[str, Any] | None:
        index, bucket = key
        if self.cache is not None:
            entry = self.cache.get(index, bucket.shape, self.videos.frame_interval)
            if entry is not None:
                return {"index": int(index), "bucket": bucket, **entry}
        sample = self.videos[key]
        if sample is None:
            return None
        return {
            "index": int(index),
            "bucket": bucket,
            "video": sample["video"],
            "path": sample["path"],
            "text": sample["text"],
        }


def collate_latent_samples(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One bucket's items -> ``{"bucket", "index" (B,), "text", "path", "latents", "video"}``.

    ``latents`` and ``video`` are lists of B entries, each a tensor or None (an item has one of
    the two); items that failed to decode are dropped, and None is returned when none is left.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    return {
        "bucket": kept[0]["bucket"],
        "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
        "text": [s["text"] for s in kept],
        "path": [s["path"] for s in kept],
        "latents": [s.get("latents") for s in kept],
        "video": [s.get("video") for s in kept],
    }


def build_latent_loader(dataset: LatentDataset, sampler: Sampler, num_workers: int = 0) -> DataLoader:
    """A DataLoader of the sampler's bucket batches, collated by :func:`collate_latent_samples`.

    The sampler fixes the order, so the loader's generator only seeds its workers."""
    extra: dict[str, Any] = {"prefetch_factor": 2} if num_workers > 0 else {}
    # Its own generator: starting a pass must not draw from the global RNG, or a resumed run's
    # noise would drift from the uninterrupted run's.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_latent_samples,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),
        **extra,
    )


@torch.no_grad()
def encode_batch_latents(
    batch: dict[str, Any], vae: torch.nn.Module, cache: LatentCache | None = None, frame_interval: int = 1
) -> torch.Tensor:
    """Raw latents (B, C, T', H', W') float32 of a collated batch, on the VAE's device.

    The items without cached latents are encoded together (they share the bucket's shape) with
    the posterior mean, and stored in ``cache`` when one is given.
    """
    param = next(vae.parameters())
    latents: list[torch.Tensor | None] = list(batch["latents"])
    misses = [i for i, z in enumerate(latents) if z is None]
    if misses:
        videos = torch.stack([batch["video"][i] for i in misses]).to(device=param.device, dtype=param.dtype)
        encoded = vae.encode_raw(videos).float()
        shape = batch["bucket"].shape
        for k, i in enumerate(misses):
            latents[i] = encoded[k]
            if cache is not None:
                index = int(batch["index"][i])
                cache.put(
                    index,
                    shape,
                    encoded[k],
                    path=batch["path"][i],
                    text=batch["text"][i],
                    frame_interval=frame_interval,
                )
    return torch.stack([z.to(device=param.device, dtype=torch.float32) for z in latents])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
