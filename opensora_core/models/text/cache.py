"""The text-embedding cache: per-prompt embeddings stored as safetensors, so repeated prompts are
encoded once, and the encoder wrapper that looks prompts up in it first."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opensora_core.models.text.embeddings import TextEmbeddings, TextEncoder, check_prompts


class TextEmbeddingCache:
    """Per-prompt text embeddings stored as safetensors under ``root/<encoder digest>/``.

    A prompt's file is named by the SHA-256 of the prompt; it holds the masked token rows
    ``tokens (n, D)``, the full ``mask (L,)`` and ``pooled (Dp,)``, with the prompt and the encoder
    name in its metadata (checked on read). Positions outside the mask come back as zeros, which
    is what every :class:`TextEncoder` returns, so a hit equals a fresh encoding. Files are written
    to a temporary name and renamed, so concurrent writers never expose a partial file.
    """

    def __init__(self, root: str | Path, encoder_name: str) -> None:
        self.encoder_name = encoder_name
        self.root = Path(root) / _sha256(encoder_name)[:16]
        self.hits = 0
        self.misses = 0

    def path_for(self, prompt: str) -> Path:
        """The file that holds ``prompt``'s embeddings."""
        digest = _sha256(prompt)
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, prompt: str) -> TextEmbeddings | None:
        """The cached embeddings of ``prompt`` (batch of one, on CPU), or None."""
        from safetensors import SafetensorError, safe_open

        path = self.path_for(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("prompt") != prompt or meta.get("encoder") != self.encoder_name:
                    return None
                rows, mask, pooled = f.get_tensor("tokens"), f.get_tensor("mask"), f.get_tensor("pooled")
        except (OSError, SafetensorError):
            return None
        tokens = rows.new_zeros(mask.shape[0], rows.shape[1])
        tokens[mask] = rows
        return TextEmbeddings(tokens[None], mask[None], pooled[None])

    def put(self, prompt: str, emb: TextEmbeddings) -> None:
        """Store ``emb`` (batch of one) as ``prompt``'s embeddings."""
        from safetensors.torch import save_file

        if len(emb) != 1:
            raise ValueError(f"put stores one prompt at a time, got a batch of {len(emb)}")
        mask = emb.mask[0].detach().cpu()
        tensors = {
            "tokens": emb.tokens[0].detach().cpu()[mask].contiguous(),
            "mask": mask.contiguous(),
            "pooled": emb.pooled[0].detach().cpu().contiguous(),
        }
        path = self.path_for(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = self.root / "encoder.json"
        if not info.is_file():
            _atomic_write_text(info, json.dumps({"encoder": self.encoder_name}, indent=2) + "\n")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        save_file(tensors, str(tmp), metadata={"prompt": prompt, "encoder": self.encoder_name})
        os.replace(tmp, path)

    def encode(
        self, encoder: TextEncoder, prompts: list[str], batch_size: int = 64, progress: bool = False
    ) -> TextEmbeddings:
        """Embeddings of ``prompts`` (B, ...) on ``encoder.device``; each distinct miss is encoded once."""
        if encoder.name != self.encoder_name:
            raise ValueError(f"cache is for encoder {self.encoder_name!r}, got {encoder.name!r}")
        prompts = check_prompts(prompts)
        found: dict[str, TextEmbeddings] = {}
        missing: list[str] = []
        for prompt in dict.fromkeys(prompts):
            cached = self.get(prompt)
            if cached is None:
                missing.append(prompt)
            else:
                found[prompt] = cached
        self.hits += len(found)
        self.misses += len(missing)
        starts = range(0, len(missing), batch_size)
        for start in tqdm(starts, desc="text embeddings", disable=not progress or len(starts) < 2):
            chunk = missing[start : start + batch_size]
            fresh = encoder.encode(chunk, batch_size=batch_size)
            for i, prompt in enumerate(chunk):
                row = fresh.select(slice(i, i + 1))
                self.put(prompt, row)
                found[prompt] = row
        return TextEmbeddings.cat([found[p].to(encoder.device) for p in prompts])


class CachedTextEncoder(TextEncoder):
    """An encoder whose prompts are looked up in a :class:`TextEmbeddingCache` first."""

    def __init__(self, encoder: TextEncoder, cache_dir: str | Path) -> None:
        super().__init__()
        self.encoder = encoder
        self.cache = TextEmbeddingCache(cache_dir, encoder.name)
        self.max_length = encoder.max_length
        self.device = encoder.device

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def token_dim(self) -> int:
        return self.encoder.token_dim

    @property
    def pooled_dim(self) -> int:
        return self.encoder.pooled_dim

    def to(self, device: torch.device | str) -> CachedTextEncoder:
        self.encoder.to(device)
        self.device = self.encoder.device
        return self

    def encode(self, prompts: list[str], batch_size: int = 64) -> TextEmbeddings:
        return self.cache.encode(self.encoder, prompts, batch_size=batch_size)

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:  # pragma: no cover - encode overrides
        return self.encode(prompts)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
