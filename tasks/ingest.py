"""The ingest stage: gather clips into ``data/raw/`` and index them as ``index.csv`` (path,text,split).

Sources (``ingest.source``):

- ``synthetic``: MovingShapes (:mod:`opensora_core.data.synthetic`), written under
  ``clips/`` (mp4) and ``stills/`` (PNG), ground truth in ``labels.parquet``; whole
  (shape, colour, motion) combinations are held out as ``val``.
- ``folder``: every video and image under ``ingest.path`` (recursively), each captioned by a
  same-named ``.txt`` file when there is one (otherwise an empty text; validation decides).
- ``csv``: a CSV with at least ``path`` and ``text``; relative paths are resolved against the
  CSV's folder.

Folder and CSV files are read where they are, never copied: the index points to them, relative
to the project root when inside it, absolute otherwise; their split is a stable hash of the path.
Every source writes ``labels.parquet`` (the ``evaluate`` stage's DVC dependency): for a folder
or a CSV it has the label columns and no rows, which says "no ground truth", and evaluate then
skips prompt adherence and reports the label-free metrics.
Paths in the index are relative to the project root (``--root``). Every run first removes what
an earlier run generated in the output folder. The same seed gives the same index, labels and
stills byte for byte and the same rendered frames; libx264's SIMD code may still make two
encodes of those frames differ slightly.

``python -m tasks.ingest [--params params.yaml] [--set ingest.num_clips=20] [--output data/raw]``
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import shutil
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config, IngestConfig
from opensora_core.data import synthetic
from opensora_core.data.tables import blank_rows, read_csv_table
from opensora_core.data.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, is_image_path, read_video
from opensora_core.errors import InputError

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["path", "text", "split"]
INDEX_FILE = "index.csv"
LABELS_FILE = "labels.parquet"
CLIPS_DIR = "clips"
STILLS_DIR = "stills"
GENERATED = (CLIPS_DIR, STILLS_DIR, INDEX_FILE, LABELS_FILE)
"""What the stage writes in its output folder, and removes before writing again."""
PREVIEW_PATH = "reports/ingest_preview.png"
MEDIA_SUFFIXES = VIDEO_SUFFIXES + IMAGE_SUFFIXES


@dataclass
class IngestSummary:
    """What one ingest run wrote; ``str()`` is the stage's one-line summary."""

    source: str
    out_dir: Path
    index: pd.DataFrame = field(repr=False)
    """The written index: columns ``path,text,split``."""
    labels: pd.DataFrame = field(repr=False)
    """Synthetic ground truth (one row per index row); no rows for other sources."""
    num_videos: int
    num_images: int
    counts: dict[str, int]
    """Flat counts for tracking: ``rows``, ``split.train``, ``shape.circle``, ..."""
    out_display: str
    """``out_dir`` as the summary shows it (relative to the root when inside it)."""

    @property
    def index_path(self) -> Path:
        return self.out_dir / INDEX_FILE

    @property
    def labels_path(self) -> Path:
        return self.out_dir / LABELS_FILE

    @property
    def has_labels(self) -> bool:
        """Whether the data has ground truth (synthetic data; never a user's folder or CSV)."""
        return not self.labels.empty

    @property
    def num_train(self) -> int:
        return int((self.index["split"] == "train").sum())

    @property
    def num_val(self) -> int:
        return int((self.index["split"] == "val").sum())

    def __str__(self) -> str:
        if self.source == "synthetic":
            what = f"{self.num_videos} clips + {self.num_images} stills"
        else:
            what = f"{self.num_videos} videos + {self.num_images} images ({self.source})"
        return f"{what}, {self.num_train} train / {self.num_val} val -> {self.out_display}"


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def ingest(cfg: IngestConfig, out_dir: Path, root: Path, *, progress: bool = True) -> IngestSummary:
    """Write ``out_dir/index.csv`` and ``labels.parquet`` (and, for synthetic data, the clips).

    Relative ``out_dir`` and ``cfg.path`` are taken relative to ``root``, the project root.
    Raises :class:`InputError` for a missing source or a CSV without ``path``/``text``.
    """
    root = _absolute(root)
    out_dir = _resolve(root, out_dir)

    # 1. Check and index a user's source before removing anything: bad input writes nothing.
    index = labels = None
    if cfg.source != "synthetic":
        source_path = _resolve(root, Path(cfg.path))
        _check_source(cfg.source, source_path, out_dir)
        if cfg.source == "folder":
            index = index_folder(source_path, root, cfg.val_fraction)
        else:
            index = index_csv(source_path, root, cfg.val_fraction)

    # 2. Remove what an earlier run generated.
    clear_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 3. Synthetic data: render and write the clips and their labels; user data has none.
    if index is None:
        index, labels = generate_synthetic(cfg, out_dir, root, progress=progress)
    else:
        labels = no_labels()

    # 4. Write the index and labels in a fixed layout: the same rows give the same bytes.
    index = index[INDEX_COLUMNS].reset_index(drop=True)
    index.to_csv(out_dir / INDEX_FILE, index=False, lineterminator="\n")
    labels.to_parquet(out_dir / LABELS_FILE, index=False)

    num_images = int(index["path"].map(is_image_path).sum())
    return IngestSummary(
        source=cfg.source,
        out_dir=out_dir,
        index=index,
        labels=labels,
        num_videos=len(index) - num_images,
        num_images=num_images,
        counts=count_rows(cfg.source, index, labels),
        out_display=index_path_of(out_dir, root),
    )


def clear_outputs(out_dir: Path) -> None:
    """Remove what the stage generates in ``out_dir`` (see :data:`GENERATED`), nothing else."""
    for name in GENERATED:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def generate_synthetic(
    cfg: IngestConfig, out_dir: Path, root: Path, *, progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render and write every MovingShapes sample; returns ``(index, labels)``.

    Each file takes milliseconds to render and encode, so this runs serially.
    """
    samples = synthetic.plan_samples(cfg)
    rows = []
    for sample in tqdm(samples, desc="ingest: rendering", unit="file", disable=not progress):
        path = synthetic.write_sample(sample, out_dir)
        rows.append({**sample.label_row(), "path": index_path_of(path, root)})
    labels = pd.DataFrame(rows, columns=list(synthetic.LABEL_COLUMNS))
    return labels[INDEX_COLUMNS].copy(), labels


def no_labels() -> pd.DataFrame:
    """The labels table of data without ground truth: every label column, no rows."""
    return pd.DataFrame({column: pd.Series(dtype=object) for column in synthetic.LABEL_COLUMNS})


def index_folder(folder: Path, root: Path, val_fraction: float) -> pd.DataFrame:
    """Every video and image under ``folder`` (hidden folders skipped), captioned by ``NAME.txt``."""
    files = sorted(
        (
            p
            for p in folder.rglob("*")
            if p.suffix.lower() in MEDIA_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        ),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise InputError(
            f"ingest.path {folder}: no video or image files found (looked for {', '.join(MEDIA_SUFFIXES)})"
        )
    rows = []
    for path in files:
        caption = path.with_suffix(".txt")
        text = _one_line(caption.read_text(encoding="utf-8", errors="replace")) if caption.is_file() else ""
        key = path.relative_to(folder).as_posix()
        rows.append({"path": index_path_of(path, root), "text": text, "split": hash_split(key, val_fraction)})
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def index_csv(csv_path: Path, root: Path, val_fraction: float) -> pd.DataFrame:
    """The rows of a CSV with ``path`` and ``text`` columns; relative paths are from its folder."""
    table = read_csv_table(csv_path, "ingest.path", ("path", "text"))
    blank = blank_rows(table["path"])
    if blank:
        raise InputError(f"ingest.path {csv_path}: empty path in data row {blank[0]}")
    rows = []
    for raw, text in zip(table["path"], table["text"]):
        raw = raw.strip()
        path = Path(raw) if Path(raw).is_absolute() else csv_path.parent / raw
        rows.append(
            {
                "path": index_path_of(path, root),
                "text": _one_line(text),
                "split": hash_split(raw, val_fraction),
            }
        )
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def hash_split(key: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` share of keys (SHA-256 of the key), else ``train``."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def index_path_of(path: Path, root: Path) -> str:
    """``path`` as the index stores it: relative to ``root`` when inside it, else absolute (posix)."""
    path = _absolute(path)
    try:
        return path.relative_to(_absolute(root)).as_posix() or "."
    except ValueError:
        return path.as_posix()


def count_rows(source: str, index: pd.DataFrame, labels: pd.DataFrame) -> dict[str, int]:
    """Flat counts for tracking: rows per split, source and kind; per label for synthetic data."""
    images = int(index["path"].map(is_image_path).sum())
    counts = {
        "rows": len(index),
        f"source.{source}": len(index),
        "videos": len(index) - images,
        "images": images,
        "split.train": int((index["split"] == "train").sum()),
        "split.val": int((index["split"] == "val").sum()),
    }
    if not labels.empty:
        for column in ("shape", "color", "motion", "background"):
            for value, n in sorted(Counter(labels[column]).items()):
                counts[f"{column}.{value}".replace(" ", "_")] = n
        counts["val_combos"] = (
            labels.loc[labels["split"] == "val", ["shape", "color", "motion"]].drop_duplicates().shape[0]
        )
    return counts


def _resolve(root: Path, path: Path) -> Path:
    path = Path(path).expanduser()
    return _absolute(path if path.is_absolute() else Path(root) / path)


def _absolute(path: Path) -> Path:
    # Normalised but not symlink-resolved: a linked data folder inside the root stays relative.
    return Path(os.path.abspath(path))


def _check_source(source: str, path: Path, out_dir: Path) -> None:
    if source == "folder" and not path.is_dir():
        raise InputError(f"ingest.path {path}: no such folder (ingest.source is folder)")
    if source == "csv" and not path.is_file():
        raise InputError(f"ingest.path {path}: no such CSV file (ingest.source is csv)")
    for name in (CLIPS_DIR, STILLS_DIR):
        generated = out_dir / name
        if path == generated or generated in path.parents:
            raise InputError(f"ingest.path {path} lies inside {generated}, which the stage clears first")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------
def write_preview(
    index: pd.DataFrame, root: Path, path: Path, *, max_clips: int = 6, cell: int = 128
) -> Path:
    """A contact sheet of up to ``max_clips`` videos: first, middle and last frame per row.

    Rows are spread evenly over the index; unreadable files are skipped. With no readable
    video the sheet says so, so the file always exists (DVC tracks it as a plot).
    """
    from PIL import Image, ImageDraw

    videos = index[np.array([not is_image_path(p) for p in index["path"]], dtype=bool)]
    picks = (
        videos.iloc[np.unique(np.linspace(0, len(videos) - 1, max_clips).round().astype(int))]
        if len(videos)
        else videos
    )
    rows = []
    for rel, text in zip(picks["path"], picks["text"]):
        try:
            frames, _ = read_video(_resolve(root, Path(rel)))
        except Exception as exc:  # a preview must not fail the stage
            log.warning("preview: skipping %s: %s", rel, exc)
            continue
        rows.append(([frames[0], frames[len(frames) // 2], frames[-1]], text))

    text_h, pad = 26, 4  # two lines of caption under each row
    width = 3 * (cell + pad) + pad
    sheet = Image.new("RGB", (width, max(1, len(rows)) * (cell + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if not rows:
        _draw_text(draw, (pad, pad), "no readable video to preview")
    for r, (frames, text) in enumerate(rows):
        top = pad + r * (cell + text_h + pad)
        for c, frame in enumerate(frames):
            img = Image.fromarray(frame)
            scale = cell / max(img.size)
            resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
            left = pad + c * (cell + pad)
            sheet.paste(img, (left + (cell - img.width) // 2, top + (cell - img.height) // 2))
        lines = textwrap.wrap(text, 66, max_lines=2, placeholder="...") or [""]
        _draw_text(draw, (pad, top + cell + 1), "\n".join(lines))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _draw_text(draw: object, xy: tuple[int, int], text: str) -> None:
    try:
        draw.text(xy, text, fill=(0, 0, 0))
    except UnicodeError:  # a bitmap font without the glyphs
        draw.text(xy, text.encode("ascii", "replace").decode(), fill=(0, 0, 0))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace, cfg: Config) -> IngestSummary:
    from opensora_core.tracking import start_stage_run

    root = _absolute(Path(args.root))
    summary = ingest(cfg.ingest, Path(args.output), root, progress=not args.quiet)
    preview = write_preview(summary.index, root, root / PREVIEW_PATH)
    with start_stage_run("ingest", cfg.tracking, params=dataclasses.asdict(cfg.ingest), root=root) as run:
        run.log_metrics(summary.counts)
        run.log_dict(summary.counts, "ingest_counts.json")
        run.log_artifact(preview)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "Ingest clips into data/raw/ and index them (synthetic MovingShapes, a folder or a CSV).",
        prog="python -m tasks.ingest",
    )
    parser.add_argument(
        "--output", default="data/raw", help="output folder, relative to --root (default: data/raw)"
    )
    parser.add_argument(
        "--root",
        default=".",
        help="project root: relative paths are taken from it and written relative to it",
    )
    return run_cli(parser, argv, _run, name="ingest")


if __name__ == "__main__":
    sys.exit(main())
