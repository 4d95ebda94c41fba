"""Text conditioning: frozen prompt encoders, condition dropout and the text-embedding cache."""

from opensora_core.models.text.encoders import (
    ENCODER_KINDS,
    CachedTextEncoder,
    MiniLMEncoder,
    T5ClipEncoder,
    TextEmbeddingCache,
    TextEmbeddings,
    TextEncoder,
    TextEncoderConfig,
    build_text_encoder,
    build_text_encoder_from_config,
    drop_conditions,
)

__all__ = [
    "ENCODER_KINDS",
    "CachedTextEncoder",
    "MiniLMEncoder",
    "T5ClipEncoder",
    "TextEmbeddingCache",
    "TextEmbeddings",
    "TextEncoder",
    "TextEncoderConfig",
    "build_text_encoder",
    "build_text_encoder_from_config",
    "drop_conditions",
]
