"""Stage ``meta``: probe every clip of the index for its size, frame count, rate and health.

    python -m tasks.meta --input data/raw/index.csv --output data/meta/meta.parquet [--num-workers N]

The output table is the input's columns plus ``num_frames, height, width, aspect_ratio,
resolution, fps, duration, codec, status, error, sha256`` (see :mod:`opensora_core.data.probe`;
``sha256`` is the file's content fingerprint, so the table changes when a file's bytes do). Rows
keep their order and none is dropped: a broken file gets a ``status`` other than ``ok`` and the
``validate`` stage decides what to do with it.

This CLI must start fast: it imports neither torch nor colossalai, diffusers,
great_expectations or mlflow (MLflow logging runs in a child process).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config, MetaConfig
from opensora_core.data.probe import META_COLUMNS, STATUSES, maybe_ray_cluster, probe_table
from opensora_core.errors import InputError
from opensora_core.tracking import log_in_subprocess

DEFAULT_INPUT = "data/raw/index.csv"
DEFAULT_OUTPUT = "data/meta/meta.parquet"
CHUNK_ROWS = 20_000
"""Index rows read, probed and written at a time."""


@dataclass
class MetaSummary:
    """Counts of one run; ``str()`` is the stage's one-line summary."""

    rows: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    output: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: rows, rows/s and one count per status."""
        return {
            "rows": self.rows,
            "rows_per_s": self.rows_per_s,
            "seconds": self.seconds,
            **{f"status_{s}": self.counts.get(s, 0) for s in STATUSES},
        }

    def __str__(self) -> str:
        parts = [f"{self.counts.get('ok', 0)} ok"]
        parts += [f"{n} {s}" for s, n in self.counts.items() if s != "ok" and n]
        return f"{self.rows} rows: {', '.join(parts)} ({self.rows_per_s:.1f} rows/s) -> {self.output}"


def meta(
    input_csv: str | Path,
    output: str | Path,
    cfg: MetaConfig,
    *,
    num_workers: int | None = None,
    progress: bool | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> MetaSummary:
    """Probe every ``path`` of ``input_csv`` and write the table to ``output``.

    ``output`` is parquet, or CSV when it ends in ``.csv``. The index is read, probed and
    written ``chunk_rows`` rows at a time (one parquet row group each), so memory does not grow
    with the table. ``num_workers`` and ``progress`` default to ``cfg``; ``cfg.engine`` picks
    pandarallel or Ray. Raises :class:`InputError` when the CSV is missing or has no ``path``.
    """
    workers = cfg.num_workers if num_workers is None else num_workers
    if workers < 0:
        raise InputError(f"--num-workers must be >= 0, got {workers}")
    show = cfg.progress if progress is None else progress
    chunks = read_index_chunks(Path(input_csv), chunk_rows)
    counts: Counter[str] = Counter()
    rows, seconds = 0, 0.0
    with maybe_ray_cluster(cfg.engine, cfg.ray_address, workers), TableWriter(Path(output)) as writer:
        for table in chunks:
            start = time.perf_counter()
            probed = probe_table(table["path"], num_workers=workers, progress=show, engine=cfg.engine)
            seconds += time.perf_counter() - start
            carried = table.drop(columns=[c for c in META_COLUMNS if c in table.columns])
            result = pd.concat([carried.reset_index(drop=True), probed], axis=1)
            writer.write(result, first_row=rows)
            counts.update(result["status"])
            rows += len(result)
    return MetaSummary(
        rows=rows,
        counts={s: counts.get(s, 0) for s in STATUSES},
        seconds=seconds,
        output=str(output),
    )


def read_index_chunks(path: Path, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    """The input CSV in chunks of ``chunk_rows`` rows (None: one chunk); it must have a ``path``
    column and at least one row (a header only is an InputError, raised before any chunk)."""
    if not path.is_file():
        raise InputError(f"input CSV not found: {path}")
    try:
        # keep_default_na=False: a caption "NA" or "None" stays text, an empty cell stays "".
        if chunk_rows is None:
            chunks: Iterable[pd.DataFrame] = [pd.read_csv(path, keep_default_na=False)]
        else:
            chunks = pd.read_csv(path, keep_default_na=False, chunksize=chunk_rows)
        no_rows = f"input CSV {path} has a header but no rows: nothing to probe"
        first = True
        for table in chunks:
            if first and "path" not in table.columns:
                raise InputError(
                    f"input CSV {path} has no 'path' column; its columns: {', '.join(table.columns)}"
                )
            if first and table.empty:
                raise InputError(no_rows)
            first = False
            yield table
        if first:  # header only: the chunked reader yields nothing
            raise InputError(no_rows)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read input CSV {path}: {exc}") from exc


class TableWriter:
    """Writes a table chunk by chunk to parquet (one row group each; the first chunk fixes the
    schema) or CSV (``.csv`` suffix), through a temporary file renamed on success."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        self.csv = output.suffix.lower() == ".csv"
        self.parquet: pq.ParquetWriter | None = None

    def __enter__(self) -> TableWriter:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, table: pd.DataFrame, first_row: int) -> None:
        if self.csv:
            table.to_csv(self.tmp, index=False, header=first_row == 0, mode="w" if first_row == 0 else "a")
            return
        if self.parquet is None:
            arrow = pa.Table.from_pandas(table, preserve_index=False)
            self.parquet = pq.ParquetWriter(self.tmp, arrow.schema)
        else:
            try:
                arrow = pa.Table.from_pandas(table, schema=self.parquet.schema, preserve_index=False)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise InputError(
                    f"a column of the index changes type at row {first_row} (the first chunk fixed "
                    f"the schema {self.parquet.schema.names}): {exc}"
                ) from exc
        self.parquet.write_table(arrow)

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if self.parquet is not None:
                self.parquet.close()
            if exc_type is None:
                self.tmp.replace(self.output)
        finally:
            self.tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace, cfg: Config) -> MetaSummary:
    summary = meta(
        args.input,
        args.output,
        cfg.meta,
        num_workers=args.num_workers,
        progress=cfg.meta.progress and not args.quiet,
    )
    log_in_subprocess(
        "meta",
        cfg.tracking,
        {
            "params": {
                "input": str(args.input),
                "output": str(args.output),
                "num_workers": cfg.meta.num_workers if args.num_workers is None else args.num_workers,
                "engine": cfg.meta.engine,
            },
            "metrics": summary.metrics(),
        },
    )
    return summary


def build_meta_parser() -> argparse.ArgumentParser:
    parser = build_parser(
        "Probe every clip of an index CSV (no decoding) into a metadata table.", "tasks.meta"
    )
    parser.add_argument(
        "--input", default=DEFAULT_INPUT, help=f"CSV with a 'path' column (default: {DEFAULT_INPUT})"
    )
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help=f"parquet, or CSV if it ends in .csv (default: {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="pandarallel workers, 0 = serial (default: meta.num_workers)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_meta_parser(), argv, run, name="meta")


if __name__ == "__main__":
    sys.exit(main())
