"""The adherence scorer checked on ground truth: real held-out clips, not samples.

A low adherence score should mean the model failed, not the metric. This scores clips whose
attributes are known with the evaluate stage's own measurements
(:func:`opensora_core.evaluation.adherence.measure_clip`):

- ``rendered``: ``--per-combo`` fresh MovingShapes clips of every held-out (``val``) combination
  of the profile's ingest settings, rendered at the evaluation's sample shape (``--height`` x
  ``--width`` x ``--frames``; their trajectory, size and background drawn as the generator draws
  them);
- ``dataset``: the ``val`` clips of ``data/raw/labels.parquet`` as ingested (mp4, their own size),
  when that table exists;
- ``+vae``: each set again after an encode/decode round trip through ``--vae`` (the best a sample
  decoded by that VAE could score).

    .venv/bin/python benchmarks/adherence_ground_truth.py                   # after `make run`
    .venv/bin/python benchmarks/adherence_ground_truth.py --vae models/vae/final --per-combo 16

A round trip does not depend on the latent statistics (encode normalises, decode undoes it), so
none are read.

The ``shape_fill`` column is the earlier shape measure, kept here for comparison: the share of its
bounding box the foreground fills (square 1.0, circle pi/4, triangle 0.5; cuts at 0.64 and 0.9),
majority over frames. Prints one line per set and, with ``--write``, a Markdown table for benchmarks/BENCHMARKS.md.
Exit 1 when a set without the VAE scores under ``--min`` on any attribute (the scorer's target).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from opensora_core.config import load_config
from opensora_core.data.synthetic import all_combos, foreground_mask, plan_samples, render
from opensora_core.data.video_io import read_video
from opensora_core.errors import InputError
from opensora_core.evaluation.adherence import ATTRIBUTES, MIN_SHAPE_PIXELS, measure_clip

Clip = tuple[np.ndarray, dict[str, str]]
"""Frames ``(T, H, W, 3)`` uint8 and the clip's ``shape``/``color``/``motion`` labels."""


def rendered_clips(params: str, per_combo: int, height: int, width: int, frames: int) -> list[Clip]:
    """``per_combo`` clips of each held-out combination of the profile's ingest settings."""
    ingest = load_config(params).ingest
    val = {s.combo for s in plan_samples(ingest) if s.split == "val" and s.kind == "clip"}
    # Draw a large data set at the sample shape: its val clips cycle the same held-out combinations.
    cfg = dataclasses.replace(
        ingest,
        sizes=[[height, width]],
        num_frames=[frames],
        num_clips=per_combo * len(all_combos()) * 2,
        num_stills=0,
    )
    clips: list[Clip] = []
    counts: dict[tuple[str, str, str], int] = {}
    for s in plan_samples(cfg):
        if s.split != "val" or s.combo not in val or counts.get(s.combo, 0) >= per_combo:
            continue
        counts[s.combo] = counts.get(s.combo, 0) + 1
        clips.append((render(s), {"shape": s.shape, "color": s.color, "motion": s.motion}))
    return clips


def dataset_clips(labels_path: Path) -> list[Clip]:
    """The ingested ``val`` clips of ``labels.parquet`` (paths relative to the project root)."""
    labels = pd.read_parquet(labels_path)
    rows = labels[(labels["split"] == "val") & (labels["kind"] == "clip")]
    return [
        (read_video(r.path)[0], {"shape": r.shape, "color": r.color, "motion": r.motion})
        for r in rows.itertuples()
    ]


def vae_round_trip(clips: list[Clip], vae_dir: str) -> list[Clip]:
    """Each clip encoded (posterior mean) and decoded by the VAE in ``vae_dir``, loaded and cropped
    to an encodable shape as the evaluate stage's reconstruction check does."""
    import torch

    from opensora_core.evaluation.reconstruction import clip_tensor, reconstruct, to_uint8
    from opensora_core.inference import load_vae_dir

    vae = load_vae_dir(Path(vae_dir)).eval()
    out = []
    with torch.no_grad():
        for frames, labels in clips:
            x = clip_tensor(frames, vae.spatial_factor, vae.temporal_factor)  # (1, 3, T, H, W)
            out.append((to_uint8(reconstruct(vae, x)[0]), labels))
    return out


def fill_shape(frames: np.ndarray) -> str | None:
    """The bounding-box fill measure of shape, majority over the frames ``(T, H, W, 3)``."""
    votes = []
    for mask in foreground_mask(frames):
        ys, xs = np.nonzero(mask)
        if len(ys) >= MIN_SHAPE_PIXELS:
            fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            votes.append("triangle" if fill < 0.64 else "circle" if fill < 0.9 else "square")
    if not votes:
        return None
    names, counts = np.unique(votes, return_counts=True)
    return str(names[np.argmax(counts)])


def score(clips: list[Clip]) -> dict[str, float]:
    """Share of clips whose measured attribute equals its label, per attribute (and ``shape_fill``)."""
    measured = [measure_clip(frames) for frames, _ in clips]
    out = {
        a: float(np.mean([getattr(m, a) == labels[a] for m, (_, labels) in zip(measured, clips)]))
        for a in ATTRIBUTES
    }
    out["shape_fill"] = float(np.mean([fill_shape(f) == labels["shape"] for f, labels in clips]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--per-combo", type=int, default=8, help="rendered clips per held-out combination")
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--labels", default="data/raw/labels.parquet")
    parser.add_argument("--vae", default="", help="a VAE folder: also score the round trip through it")
    parser.add_argument("--min", type=float, default=0.95, help="the scorer's target on every attribute")
    parser.add_argument("--write", action="store_true", help="print a Markdown table at the end")
    args = parser.parse_args()

    sets = {"rendered": rendered_clips(args.params, args.per_combo, args.height, args.width, args.frames)}
    if Path(args.labels).is_file():
        sets["dataset"] = dataset_clips(Path(args.labels))
    if args.vae:
        for name in list(sets):
            sets[f"{name}+vae"] = vae_round_trip(sets[name], args.vae)
    rows = []
    for name, clips in sets.items():
        s = score(clips)
        rows.append((name, len(clips), s))
        print(
            f"{name}: {len(clips)} clips, "
            + ", ".join(f"{a} {s[a]:.3f}" for a in ATTRIBUTES)
            + f" (shape_fill {s['shape_fill']:.3f})",
            flush=True,
        )
    if args.write:
        print(f"\n{platform.node()}, {args.params}, rendered at {args.height}x{args.width}x{args.frames}\n")
        print("| clips | count | colour | motion | shape | shape_fill |")
        print("|---|---|---|---|---|---|")
        for name, n, s in rows:
            print(
                f"| {name} | {n} | " + " | ".join(f"{s[a]:.3f}" for a in (*ATTRIBUTES, "shape_fill")) + " |"
            )
    low = [(n, a) for n, _, s in rows if "+vae" not in n for a in ATTRIBUTES if s[a] < args.min]
    if low:
        sys.exit(f"the scorer is under {args.min} on ground truth: {low}")


if __name__ == "__main__":
    try:
        main()
    except InputError as exc:  # a missing VAE folder or labels table: its message, exit 2
        print(f"adherence_ground_truth: {exc}", file=sys.stderr)
        sys.exit(2)
