"""Prompt adherence on MovingShapes: does a generated clip show the colour, motion and shape asked for?

The prompts name (shape, colour, motion) combinations held out of training (the ``val`` rows of
``labels.parquet``), so a model scores only by composing what it learnt, not by recalling clips.
Each generated clip is measured from its pixels with the data generator's own measurements:

- colour: the colour most foreground pixels are nearest to (:func:`dominant_color`);
- motion: the direction of the foreground centroid's travel, from a least-squares line through
  its track over all frames, ``static`` under a tenth of the frame's shorter side
  (:func:`centroid_track`, :func:`motion_of_track`, :data:`STATIC_SHARE`);
- shape: which of the three shapes, drawn as the generator draws it with the foreground's area
  and centroid, overlaps the foreground most (intersection over union), majority over frames
  (:func:`shape_of_mask`). A decoded sample is a low-passed picture: its corners round off, so a
  square's or a triangle's share of its bounding box drifts towards a circle's, while its outline
  still matches its own template best (benchmarks/BENCHMARKS.md, "the scorer on ground truth").

Accuracy is the share of clips whose measurement equals the prompt's attribute; chance is the
accuracy of a uniform guess, one over the number of values (colour 1/6, motion 1/5, shape 1/3).
This module imports neither torch nor anything heavy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from opensora_core.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    SHAPES,
    STATIC_SHARE,
    centroid_track,
    dominant_color,
    foreground_mask,
    make_caption,
    motion_of_track,
    shape_area,
    shape_centroid,
    shape_coverage,
)
from opensora_core.errors import InputError

ATTRIBUTES = ("color", "motion", "shape")
CHANCE = {"color": 1 / len(COLORS), "motion": 1 / len(MOTIONS), "shape": 1 / len(SHAPES)}
"""Accuracy of a uniform guess per attribute."""

MIN_SHAPE_PIXELS = 12
"""Frames with fewer foreground pixels give no shape vote (too small to tell)."""


@dataclass(frozen=True)
class AdherencePrompt:
    """One evaluation prompt and the attributes it asks for."""

    text: str
    shape: str
    color: str
    motion: str
    background: str


@dataclass(frozen=True)
class Measurement:
    """What the pixels of one clip show; None where nothing could be measured."""

    color: str | None
    motion: str | None
    shape: str | None


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
def build_adherence_prompts(
    labels: pd.DataFrame, num_prompts: int, seed: int = 0, split: str = "val"
) -> list[AdherencePrompt]:
    """``num_prompts`` prompts over the (shape, colour, motion) combinations of ``split`` clips.

    Combinations are taken in sorted order and cycled until ``num_prompts`` are made; each prompt
    gets a background and a caption drawn from ``seed``, so the set is fixed for a seed and the
    labels. Raises InputError when ``labels`` has no clip of ``split``.
    """
    clips = labels[(labels["split"] == split) & (labels["kind"] == "clip")]
    combos = sorted({(r.shape, r.color, r.motion) for r in clips.itertuples()})
    if not combos:
        raise InputError(f"labels hold no {split!r} clips to build adherence prompts from")
    rng = np.random.default_rng([seed, 7])
    backgrounds = list(BACKGROUNDS)
    prompts = []
    for i in range(num_prompts):
        shape, color, motion = combos[i % len(combos)]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        text = make_caption(rng, "clip", shape, color, motion, background)
        prompts.append(AdherencePrompt(text, shape, color, motion, background))
    return prompts


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def shape_ious(mask: np.ndarray) -> dict[str, float] | None:
    """IoU of one frame's foreground mask ``(H, W)`` bool with each shape's template; None when
    the mask is too small to tell (under :data:`MIN_SHAPE_PIXELS`).

    The template of a shape has the mask's area (its radius solves ``shape_area * r**2 = area``)
    and its area centroid on the mask's centroid; it is the generator's anti-aliased coverage.
    """
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if len(ys) < MIN_SHAPE_PIXELS:
        return None
    cy, cx = ys.mean(), xs.mean()
    fg = mask.astype(np.float64)
    out = {}
    for shape in SHAPES:
        radius = float(np.sqrt(len(ys) / shape_area(shape)))
        dy, dx = shape_centroid(shape) * radius
        yy = np.arange(mask.shape[0], dtype=np.float64)[:, None] - (cy - dy)
        xx = np.arange(mask.shape[1], dtype=np.float64)[None, :] - (cx - dx)
        template = shape_coverage(shape, yy, xx, radius)  # (H, W)
        out[shape] = float(np.minimum(template, fg).sum() / np.maximum(template, fg).sum())
    return out


def shape_of_mask(mask: np.ndarray) -> str | None:
    """Shape name of one frame's foreground mask ``(H, W)`` bool: the template it overlaps most
    (:func:`shape_ious`); None when the mask is too small to tell."""
    ious = shape_ious(mask)
    return None if ious is None else max(ious, key=ious.__getitem__)


def measure_shape(frames: np.ndarray) -> str | None:
    """Majority shape over the frames ``(T, H, W, 3)`` uint8 (None when no frame votes)."""
    votes = [shape_of_mask(m) for m in foreground_mask(frames)]
    votes = [v for v in votes if v is not None]
    if not votes:
        return None
    names, counts = np.unique(votes, return_counts=True)
    return str(names[np.argmax(counts)])


def measure_clip(frames: np.ndarray) -> Measurement:
    """Colour, motion and shape of one clip ``(T, H, W, 3)`` uint8 (T = 1 gives motion ``static``)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    color = dominant_color(frames)
    still_under = STATIC_SHARE * min(frames.shape[1:3])
    motion = motion_of_track(centroid_track(frames), still_under) if color is not None else None
    return Measurement(color=color, motion=motion, shape=measure_shape(frames))


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def score_adherence(
    prompts: Sequence[AdherencePrompt], measurements: Sequence[Measurement]
) -> dict[str, float]:
    """``adherence_{color,motion,shape}`` (share of matches), ``chance_*`` and ``num_samples``."""
    if len(prompts) != len(measurements):
        raise ValueError(f"{len(prompts)} prompts but {len(measurements)} measurements")
    n = len(prompts)
    out: dict[str, float] = {}
    for attr in ATTRIBUTES:
        hits = sum(getattr(p, attr) == getattr(m, attr) for p, m in zip(prompts, measurements))
        out[f"adherence_{attr}"] = hits / n if n else 0.0
    out.update({f"chance_{attr}": CHANCE[attr] for attr in ATTRIBUTES})
    out["num_samples"] = n
    return out


def adherence_table(prompts: Sequence[AdherencePrompt], measurements: Sequence[Measurement]) -> pd.DataFrame:
    """One row per sample: the prompt's attributes, the measured ones (``measured_*``) and matches."""
    rows = []
    for i, (p, m) in enumerate(zip(prompts, measurements)):
        row = {"index": i, **asdict(p)}
        for attr in ATTRIBUTES:
            row[f"measured_{attr}"] = getattr(m, attr)
            row[f"{attr}_ok"] = getattr(p, attr) == getattr(m, attr)
        rows.append(row)
    return pd.DataFrame(rows)
