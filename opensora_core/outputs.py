"""Output files of the samplers: a file-name-safe slug of a prompt, and one sample (mp4, or PNG
for a single frame) written with a ``.txt`` of its prompt, seed and settings beside it.

Shared by ``tasks.sample`` and the evaluate job; imports neither torch nor the models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

SLUG_MAX = 60


def slugify(text: str, max_len: int = SLUG_MAX) -> str:
    """A file-name-safe slug of ``text``: lowercase ASCII letters, digits and single dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


def save_output(
    out_dir: Path,
    index: int,
    prompt: str,
    seed: int,
    frames: np.ndarray,
    fps: float,
    settings: dict[str, Any],
) -> Path:
    """Write one output (mp4, or PNG for one frame) and its ``.txt``; returns the media path."""
    from opensora_core.data.video_io import write_image, write_video

    stem = out_dir / f"{index:04d}_{slugify(prompt)}"
    if len(frames) == 1:
        path = write_image(stem.with_suffix(".png"), frames[0])
    else:
        path = write_video(stem.with_suffix(".mp4"), frames, fps)
    info = {"prompt": prompt, "seed": seed, "index": index, **settings}
    stem.with_suffix(".txt").write_text("\n".join(f"{k}: {v}" for k, v in info.items()) + "\n")
    return path
