"""Adherence measurer: the generator's own clips score near 100%, noise near chance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from opensora_core.config import IngestConfig
from opensora_core.data.synthetic import SHAPES, plan_samples, render, write_sample
from opensora_core.data.video_io import read_video
from opensora_core.errors import InputError
from opensora_core.evaluation.adherence import (
    CHANCE,
    AdherencePrompt,
    Measurement,
    adherence_table,
    build_adherence_prompts,
    measure_clip,
    score_adherence,
    shape_of_mask,
)

CFG = IngestConfig(num_clips=180, num_stills=6, val_combos=6, num_frames=[9], seed=3)


def as_prompt(sample) -> AdherencePrompt:
    return AdherencePrompt(sample.text, sample.shape, sample.color, sample.motion, sample.background)


@pytest.fixture(scope="module")
def clips():
    return [s for s in plan_samples(CFG) if s.kind == "clip"]


def test_ground_truth_clips_score_near_100_percent(clips) -> None:
    scores = score_adherence([as_prompt(s) for s in clips], [measure_clip(render(s)) for s in clips])
    assert scores["adherence_color"] == 1.0
    assert scores["adherence_motion"] == 1.0
    assert scores["adherence_shape"] >= 0.95
    assert scores["num_samples"] == len(clips)


def test_clips_read_back_from_mp4_score_the_same(tmp_path, clips) -> None:
    picked = clips[:12]
    frames = [read_video(write_sample(s, tmp_path))[0] for s in picked]
    scores = score_adherence([as_prompt(s) for s in picked], [measure_clip(f) for f in frames])
    assert scores["adherence_color"] == 1.0 and scores["adherence_motion"] == 1.0
    assert scores["adherence_shape"] >= 11 / 12


def test_noise_scores_near_chance(clips) -> None:
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, size=(9, 48, 64, 3), dtype=np.uint8) for _ in clips]
    scores = score_adherence([as_prompt(s) for s in clips], [measure_clip(f) for f in noise])
    # The clips cover the combinations evenly, so any fixed answer scores about 1 / (number of values).
    for attr in ("color", "motion", "shape"):
        assert abs(scores[f"adherence_{attr}"] - CHANCE[attr]) < 0.1, (attr, scores)
        assert scores[f"chance_{attr}"] == pytest.approx(CHANCE[attr])


def test_dark_frames_measure_nothing() -> None:
    m = measure_clip(np.full((5, 32, 32, 3), 20, dtype=np.uint8))
    assert m == Measurement(color=None, motion=None, shape=None)
    assert (
        score_adherence([AdherencePrompt("x", "circle", "red", "left", "black")], [m])["adherence_color"] == 0
    )


def test_shape_from_fill_ratio() -> None:
    yy, xx = np.mgrid[:40, :40]
    assert shape_of_mask((yy - 20) ** 2 + (xx - 20) ** 2 <= 12**2) == "circle"
    assert shape_of_mask((abs(yy - 20) <= 10) & (abs(xx - 20) <= 10)) == "square"
    assert shape_of_mask((yy >= 10) & (yy <= 30) & (abs(xx - 20) <= (yy - 10) / 2)) == "triangle"
    assert shape_of_mask(np.zeros((40, 40), bool)) is None


def test_prompts_come_from_held_out_combinations() -> None:
    samples = plan_samples(CFG)
    labels = pd.DataFrame([s.label_row() for s in samples])
    val = {(s.shape, s.color, s.motion) for s in samples if s.split == "val" and s.kind == "clip"}
    prompts = build_adherence_prompts(labels, 12, seed=0)
    assert len(prompts) == 12
    assert {(p.shape, p.color, p.motion) for p in prompts} == val
    for p in prompts:
        assert p.color in p.text and p.shape in p.text and p.background in p.text
    assert prompts == build_adherence_prompts(labels, 12, seed=0)
    assert [p.text for p in prompts] != [p.text for p in build_adherence_prompts(labels, 12, seed=1)]
    with pytest.raises(InputError, match="no 'test' clips"):
        build_adherence_prompts(labels, 4, split="test")


def test_table_lists_each_sample() -> None:
    prompts = [AdherencePrompt("a", "circle", "red", "left", "black")]
    table = adherence_table(prompts, [Measurement("red", "right", "circle")])
    row = table.iloc[0]
    assert row["color_ok"] and not row["motion_ok"] and row["shape_ok"] and row["measured_motion"] == "right"
    assert set(SHAPES) >= {row["shape"]}


def blurred(frame: np.ndarray, sigma: float) -> np.ndarray:
    """A frame ``(H, W, 3)`` uint8 low-passed by a separable Gaussian (as a decoder softens edges)."""
    radius = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    x = frame.astype(np.float64)
    x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, x)
    x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, x)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", SHAPES)
def test_softened_shapes_keep_their_name(shape) -> None:
    # A 48 px frame with a shape of radius 7 (the generator's 48 px range is 5.8-9.6), blurred as
    # a small VAE's decoder blurs: the rounded corners still match their own template best.
    from opensora_core.data.synthetic import foreground_mask, shape_coverage

    yy, xx = np.mgrid[0:48, 0:48].astype(np.float64)
    alpha = shape_coverage(shape, yy - 24.3, xx - 23.6, 7.0)[..., None]
    frame = np.round(np.full((48, 48, 3), 20.0) * (1 - alpha) + np.array([230, 40, 40]) * alpha)
    for sigma in (0.0, 0.8, 1.2):
        soft = blurred(frame.astype(np.uint8), sigma) if sigma else frame.astype(np.uint8)
        assert shape_of_mask(foreground_mask(soft)) == shape, (shape, sigma)


def test_a_round_blob_reads_as_a_circle_and_ious_are_shares() -> None:
    from opensora_core.evaluation.adherence import shape_ious

    yy, xx = np.mgrid[0:48, 0:48]
    blob = np.exp(-((yy - 20.0) ** 2 + (xx - 26.0) ** 2) / (2 * 5.0**2)) > 0.5
    ious = shape_ious(blob)
    assert max(ious, key=ious.get) == "circle"
    assert all(0.0 < v <= 1.0 for v in ious.values())
    assert shape_ious(np.zeros((48, 48), bool)) is None
