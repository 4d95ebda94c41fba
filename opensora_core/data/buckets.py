"""Shape buckets: which (num_frames, height, width) each training sample is cut to.

Samples of one micro-batch must share a shape, and videos come in many sizes, lengths and aspect
ratios. Following Open-Sora's bucket system, a bucket config names the shapes a run trains on::

    {resolution_name: {num_frames: (probability, batch_size)}}
    e.g. {"32px": {1: (1.0, 16), 9: (1.0, 4)}, "64px": {17: (0.5, 2)}}

``num_frames`` 1 holds images (stills). Each resolution name has an aspect-ratio table, ratio
(height / width) -> (h, w) with ``h * w`` close to the named area and both sides multiples of a
spatial factor (8 for the VAE, 16 for VAE x patch). A bucket is one (resolution, num_frames,
aspect ratio) cell with its (h, w) and batch size.

Assignment of one sample (index, height, width, num_frames):

1. take the closest aspect ratio of the tables (in log space, so 1:2 and 2:1 are equally far
   from 1:1);
2. walk the buckets largest first (area, then num_frames); a bucket is a candidate when the
   sample is long enough (``(T - 1) * frame_interval + 1`` frames; stills only go to T = 1) and
   large enough (reaching the bucket's (h, w) needs an upscale of at most ``max_upscale``);
3. keep the first candidate whose coin, drawn with its probability, comes up; ``None`` when no
   candidate is kept (the sample sits out this epoch).

The coins come from a counter-based hash of (seed, epoch, index, bucket), not from a stateful
RNG: any rank, any worker, in any order, computes the same assignment, and a whole column of
samples is assigned in a few vectorised numpy operations.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from opensora_core.errors import ConfigError

# Aspect ratios (height / width) of the tables, portrait to landscape: 1:4 ... 1:1 ... 4:1.
_RATIO_PAIRS = ((1, 4), (1, 3), (9, 21), (1, 2), (9, 16), (5, 8), (2, 3), (3, 4), (4, 5), (1, 1))
ASPECT_RATIOS: tuple[float, ...] = tuple(
    sorted({round(h / w, 2) for h, w in _RATIO_PAIRS} | {round(w / h, 2) for h, w in _RATIO_PAIRS})
)

# Named resolutions: "Npx" is an N x N area, "Np" the area of an N-line 16:9 frame (480p: 480 x 854).
RESOLUTION_NAMES = ("32px", "48px", "64px", "144p", "256px", "360p", "480p", "720p", "1080p")
_RESOLUTION_RE = re.compile(r"^(\d+)(px|p)$")


def resolution_area(name: str) -> int:
    """Pixel area a resolution name stands for: ``"64px"`` -> 4096, ``"480p"`` -> 480 * 854."""
    match = _RESOLUTION_RE.match(name)
    if match is None or int(match.group(1)) <= 0:
        raise ConfigError(
            f"unknown resolution name {name!r}: use 'Npx' (N x N) or 'Np' (16:9, N lines), "
            f"e.g. {', '.join(RESOLUTION_NAMES)}"
        )
    side = int(match.group(1))
    if match.group(2) == "px":
        return side * side
    long_side = 2 * math.ceil(side * 16 / 9 / 2)  # even, like the usual 854 of 480p
    return side * long_side


def aspect_ratio_table(name: str, spatial_factor: int = 8) -> dict[float, tuple[int, int]]:
    """Ratio (height / width) -> (h, w) for a resolution name, sides multiples of ``spatial_factor``.

    Of the four ways to round (h, w) to the factor, the one closest to both the ratio and the
    named area (in log space) wins; sides are at least one factor.
    """
    if spatial_factor < 1:
        raise ConfigError(f"spatial_factor must be >= 1, got {spatial_factor}")
    area = resolution_area(name)
    f = spatial_factor
    table = {}
    for ratio in ASPECT_RATIOS:
        h_exact, w_exact = math.sqrt(area * ratio), math.sqrt(area / ratio)
        candidates = [
            (h, w)
            for h in {max(f, math.floor(h_exact / f) * f), max(f, math.ceil(h_exact / f) * f)}
            for w in {max(f, math.floor(w_exact / f) * f), max(f, math.ceil(w_exact / f) * f)}
        ]
        table[ratio] = min(
            sorted(candidates),
            key=lambda hw: math.log(hw[0] / hw[1] / ratio) ** 2 + math.log(hw[0] * hw[1] / area) ** 2,
        )
    return table


def closest_ratio(height: float, width: float, ratios: Sequence[float] = ASPECT_RATIOS) -> float:
    """The table ratio closest to ``height / width`` (in log space)."""
    return min(ratios, key=lambda r: abs(math.log(r) - math.log(height / width)))


def stable_uniform(seed: int, epoch: int, index: Any, salt: int = 0) -> np.ndarray:
    """Uniform floats in [0, 1), a pure function of (seed, epoch, index, salt).

    ``index`` is an int or an array of ints; the result has its shape. Each argument is folded
    in with a SplitMix64 finaliser, so neighbouring indices give unrelated values.
    """
    mask = (1 << 64) - 1
    h = np.full(np.shape(index), _splitmix64_int(seed & mask), dtype=np.uint64)
    h = _splitmix64(h ^ np.uint64(epoch & mask))
    h = _splitmix64(h ^ np.asarray(index).astype(np.int64).astype(np.uint64))
    h = _splitmix64(h ^ np.uint64(salt & mask))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _splitmix64_int(x: int) -> np.uint64:
    return _splitmix64(np.array([x], dtype=np.uint64))[0]


@dataclass(frozen=True, order=True)
class Bucket:
    """One training shape: samples in a micro-batch share it. Hashable; used as the batch key."""

    resolution: str
    num_frames: int
    height: int
    width: int
    batch_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(num_frames, height, width) of every sample in the bucket."""
        return self.num_frames, self.height, self.width


@dataclass
class BucketOptions:
    config: Mapping[str, Mapping[int, Any]]
    """{resolution_name: {num_frames: (probability, batch_size)}}; lists and string keys (as YAML
    gives them) are accepted."""
    spatial_factor: int = 8
    """Bucket heights and widths are multiples of this (the VAE's downsampling, or VAE x patch)."""
    max_upscale: float = 1.25
    """Largest upscale allowed to reach a bucket's (h, w); a sample needing more skips that bucket."""
    frame_interval: int = 1
    """Frames between two sampled frames: a T-frame bucket needs ``(T - 1) * interval + 1`` frames."""
    stills_from_videos: bool = False
    """Let videos fill one-frame buckets too (one frame taken); otherwise only images go there."""

    def __post_init__(self) -> None:
        if self.spatial_factor < 1:
            raise ConfigError(f"spatial_factor must be >= 1, got {self.spatial_factor}")
        if self.max_upscale < 1.0:
            raise ConfigError(f"max_upscale must be >= 1.0, got {self.max_upscale}")
        if self.frame_interval < 1:
            raise ConfigError(f"frame_interval must be >= 1, got {self.frame_interval}")
        parse_bucket_config(self.config)


def parse_bucket_config(config: Mapping[str, Mapping[Any, Any]]) -> list[tuple[str, int, float, int]]:
    """Check a bucket config; returns (resolution, num_frames, probability, batch_size), largest first."""
    if not isinstance(config, Mapping):
        raise ConfigError(
            "the bucket config must map resolution names to {num_frames: (probability, batch_size)}"
        )
    entries = []
    for resolution, by_frames in config.items():
        resolution_area(resolution)
        if not isinstance(by_frames, Mapping) or not by_frames:
            raise ConfigError(f"buckets[{resolution!r}] must map num_frames -> (probability, batch_size)")
        for frames, value in by_frames.items():
            entries.append((resolution, *_parse_entry(resolution, frames, value)))
    if not entries:
        raise ConfigError("the bucket config names no bucket")
    entries.sort(key=lambda e: (resolution_area(e[0]), e[1], e[0]), reverse=True)
    return entries


def _parse_entry(resolution: str, frames: Any, value: Any) -> tuple[int, float, int]:
    where = f"buckets[{resolution!r}][{frames!r}]"
    try:
        num_frames = int(frames)
        probability, batch_size = value
        probability, batch_size = float(probability), int(batch_size)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where} must be (probability, batch_size) under an int num_frames") from err
    if num_frames < 1:
        raise ConfigError(f"{where}: num_frames must be >= 1")
    if not 0.0 <= probability <= 1.0:
        raise ConfigError(f"{where}: probability must be in [0, 1], got {probability}")
    if batch_size < 1:
        raise ConfigError(f"{where}: batch_size must be >= 1, got {batch_size}")
    return num_frames, probability, batch_size


class Buckets:
    """The bucket set of a run: assigns samples to buckets, deterministically per (seed, epoch)."""

    def __init__(self, options: BucketOptions) -> None:
        self.options = options
        self.entries = parse_bucket_config(options.config)
        self.ratios = np.array(ASPECT_RATIOS)
        self.tables = {
            name: aspect_ratio_table(name, options.spatial_factor) for name in {e[0] for e in self.entries}
        }
        # Per resolution, (h, w) indexed like self.ratios, for vectorised lookups.
        self._sizes = {
            name: np.array([table[r] for r in ASPECT_RATIOS], dtype=np.int64)
            for name, table in self.tables.items()
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Mapping[int, Any]], **options: Any) -> Buckets:
        """Shorthand for ``Buckets(BucketOptions(config, **options))``."""
        return cls(BucketOptions(config, **options))

    def all(self) -> list[Bucket]:
        """Every distinct bucket (one per resolution, num_frames and distinct (h, w)), largest first."""
        out: dict[Bucket, None] = {}
        for name, frames, _, batch_size in self.entries:
            for h, w in self._sizes[name]:
                out[Bucket(name, frames, int(h), int(w), batch_size)] = None
        return list(out)

    def assign(
        self, index: int, height: float, width: float, num_frames: float, seed: int = 0, epoch: int = 0
    ) -> Bucket | None:
        """The bucket of one sample, or None when none fits (see the module docstring)."""
        return self.assign_many([height], [width], [num_frames], seed=seed, epoch=epoch, indices=[index])[0]

    def assign_many(
        self,
        heights: Sequence[float] | np.ndarray,
        widths: Sequence[float] | np.ndarray,
        num_frames: Sequence[float] | np.ndarray,
        seed: int = 0,
        epoch: int = 0,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> list[Bucket | None]:
        """Buckets of many samples at once; ``indices`` default to ``0 .. n-1``.

        Missing or non-positive sizes (NaN, 0) fit no bucket.
        """
        codes, catalogue = self.assign_codes(heights, widths, num_frames, seed, epoch, indices)
        return [catalogue[c] if c >= 0 else None for c in codes.tolist()]

    def assign_codes(
        self,
        heights: Sequence[float] | np.ndarray,
        widths: Sequence[float] | np.ndarray,
        num_frames: Sequence[float] | np.ndarray,
        seed: int = 0,
        epoch: int = 0,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[Bucket]]:
        """Like :meth:`assign_many`, as ``(codes (n,) int64, catalogue)``: sample ``i`` goes to
        ``catalogue[codes[i]]``, or nowhere when ``codes[i] == -1``. Fast for millions of rows."""
        h = np.nan_to_num(np.asarray(heights, dtype=np.float64), nan=0.0)
        w = np.nan_to_num(np.asarray(widths, dtype=np.float64), nan=0.0)
        t = np.nan_to_num(np.asarray(num_frames, dtype=np.float64), nan=0.0)
        n = len(h)
        idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if not (len(w) == len(t) == len(idx) == n):
            raise ValueError("heights, widths, num_frames and indices must have the same length")
        valid = (h > 0) & (w > 0) & (t >= 1)
        safe_h, safe_w = np.where(valid, h, 1.0), np.where(valid, w, 1.0)
        log_gap = np.abs(np.log(self.ratios)[None, :] - np.log(safe_h / safe_w)[:, None])
        ratio_id = np.argmin(log_gap, axis=1)
        is_still = t < 2
        opts = self.options

        codes = np.full(n, -1, dtype=np.int64)
        catalogue: dict[Bucket, int] = {}
        open_ = valid.copy()
        for name, frames, probability, batch_size in self.entries:
            size = self._sizes[name][ratio_id]  # (n, 2)
            upscale = np.maximum(size[:, 0] / safe_h, size[:, 1] / safe_w)
            if frames == 1:
                long_enough = is_still | opts.stills_from_videos
            else:
                long_enough = ~is_still & (t >= (frames - 1) * opts.frame_interval + 1)
            candidate = open_ & long_enough & (upscale <= opts.max_upscale + 1e-9)
            if not candidate.any():
                continue
            coin = stable_uniform(seed, epoch, idx, salt=zlib.crc32(f"{name}/{frames}".encode()))
            keep = candidate & (coin < probability)
            for rid in np.unique(ratio_id[keep]):
                height, width = (int(v) for v in self._sizes[name][rid])
                bucket = Bucket(name, frames, height, width, batch_size)
                codes[keep & (ratio_id == rid)] = catalogue.setdefault(bucket, len(catalogue))
            open_ &= ~keep
        return codes, list(catalogue)
