"""What a text encoder returns and the contract every encoder keeps.

:class:`TextEmbeddings` holds ``tokens (B, L, D)`` (zero outside the mask), ``mask (B, L)`` and
``pooled (B, Dp)``. Prompts are padded to a fixed ``max_length``, so a prompt's embedding does not
depend on the batch it was encoded in, and cached rows can be stacked with freshly encoded ones.
:func:`drop_conditions` (for classifier-free guidance) replaces the token states and the pooled
vector of a sample, each with its own probability, by the encoder's empty-prompt embeddings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


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
        prompts = check_prompts(prompts)
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


def check_prompts(prompts: list[str]) -> list[str]:
    """``prompts`` as a list; TypeError unless it is a list of strings, ValueError when empty."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if not prompts:
        raise ValueError("prompts must not be empty")
    return list(prompts)
