"""The validation suite run batch by batch: memory bounded by the batch, not the table.

A metadata table of millions of rows is read from parquet in record batches; each batch is
checked by the same Great Expectations suite (:mod:`opensora_core.data.validation`) with row ids
that keep their input positions, its clean rows are appended to ``clean.parquet`` at once, and
only its quarantined rows are kept (the reasons of a duplicated path name the occurrence that
stays clean, which may come in a later batch, so they are written at the end).

Duplicate paths across batches: GX's ``path_unique`` sees one batch at a time. Before the
batches, :func:`find_duplicate_paths` streams the ``path`` column once, keeps a 64-bit hash per
row (8 bytes a row), and gathers the exact paths of the hashes seen twice in a second streamed
pass (hash collisions are ruled out there). In every batch ``path_unique``'s unexpected rows are
then the rows whose path is in that set: the same rows GX reports on the whole table (every
occurrence of a duplicated path). GX's own per-batch result must be a subset of them; anything
else is a bug and raises. The duplicate policy is applied in row order across batches, so the
first passing occurrence stays clean exactly as on the whole table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from opensora_core.config import ValidateConfig
from opensora_core.data.validation import (
    HELPER_COLUMNS,
    ROW_ID,
    ValidationResult,
    build_checks,
    build_report,
    build_suite_runner,
    check_columns,
    count_by,
    prepare_table,
    quarantine_records,
)
from opensora_core.errors import InputError

BATCH_ROWS = 100_000
"""Rows per record batch when streaming a parquet table (about 0.4 GB of peak memory in GX)."""


def path_hashes(paths: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the non-null paths and the positions they come from."""
    present = paths.notna().to_numpy()
    values = paths[present].astype(str).to_numpy(dtype=object)
    return pd.util.hash_array(values, categorize=False), np.flatnonzero(present)


def find_duplicate_paths(
    path_batches: Iterable[pd.Series] | Callable[[], Iterator[pd.Series]],
) -> set[str]:
    """The paths that occur more than once, over batches of the ``path`` column.

    ``path_batches`` is iterated twice (a list, or a callable returning a fresh iterator): once
    for the hashes of every path, once to gather the exact paths behind repeated hashes.
    """
    if callable(path_batches):
        batches = path_batches
    else:
        items = list(path_batches)  # a one-shot iterator could not be read twice
        batches = lambda: iter(items)  # noqa: E731
    hashes = [path_hashes(paths)[0] for paths in batches()]
    every = np.sort(np.concatenate(hashes)) if hashes else np.empty(0, dtype=np.uint64)
    repeated = np.unique(every[1:][every[1:] == every[:-1]])
    if not len(repeated):
        return set()
    counts: Counter[str] = Counter()
    for paths in batches():
        values, where = path_hashes(paths)
        candidates = paths.iloc[where[np.isin(values, repeated)]].astype(str)
        counts.update(candidates.tolist())
    return {path for path, n in counts.items() if n > 1}


class BatchValidator:
    """Runs the suite on consecutive batches of one table and builds the final report."""

    def __init__(self, cfg: ValidateConfig, duplicate_paths: set[str]) -> None:
        self.cfg = cfg
        self.checks = build_checks(cfg)
        self.run_suite = build_suite_runner(self.checks)
        self.duplicates = duplicate_paths
        self.rows = 0
        self.unexpected_counts = {chk.name: 0 for chk in self.checks}
        self.failed: dict[int, list[str]] = {}
        self.kept: dict[Any, int] = {}
        self.bad_parts: list[pd.DataFrame] = []
        self.empty_bad: pd.DataFrame | None = None

    def add(self, table: pd.DataFrame) -> np.ndarray:
        """Check the next batch (rows in input order); returns its clean-row mask."""
        # 1. The suite, with row ids continuing from the previous batches.
        frame = prepare_table(table, first_row=self.rows)
        self.rows += len(frame)
        unexpected = self.run_suite(frame)
        unexpected["path_unique"] = self._duplicate_rows(frame, unexpected["path_unique"])

        # 2. Failed expectations per row id, in suite order.
        failed: dict[int, list[str]] = {}
        for chk in self.checks:
            self.unexpected_counts[chk.name] += len(unexpected[chk.name])
            for row_id in unexpected[chk.name]:
                failed.setdefault(row_id, []).append(chk.name)

        # 3. Duplicate policy: the first occurrence (over all batches so far) passing the rest stays.
        first = int(frame[ROW_ID].iloc[0]) if len(frame) else 0
        for row_id in unexpected["path_unique"]:
            path = frame.at[row_id - first, "path"]
            if failed[row_id] == ["path_unique"] and path not in self.kept:
                self.kept[path] = row_id
                del failed[row_id]

        # 4. Keep the bad rows (with their helper columns) for the report written at the end.
        bad = frame[ROW_ID].isin(list(failed)).to_numpy()
        self.failed.update(failed)
        if bad.any():
            self.bad_parts.append(frame.loc[bad])
        elif self.empty_bad is None:
            self.empty_bad = frame.iloc[:0]
        return ~bad

    def _duplicate_rows(self, frame: pd.DataFrame, in_batch: list[int]) -> list[int]:
        """Row ids of the batch whose path occurs more than once in the whole table."""
        rows = frame.loc[frame["path"].notna(), ["path", ROW_ID]]
        ids = rows.loc[rows["path"].astype(str).isin(self.duplicates), ROW_ID].tolist()
        stray = set(in_batch) - set(ids)
        if stray:
            raise RuntimeError(
                f"GX found duplicated paths missed by the table-wide pass: rows {sorted(stray)[:5]}"
            )
        return sorted(ids)

    def finish(self, clean_rows: int, clean_by_split: dict[str, int]) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The quarantine table (reasons naming the kept occurrences) and the report."""
        if self.bad_parts:
            bad = pd.concat(self.bad_parts) if len(self.bad_parts) > 1 else self.bad_parts[0]
        elif self.empty_bad is not None:
            bad = self.empty_bad
        else:
            raise InputError("no batch was validated")
        quarantine = quarantine_records(bad, self.failed, self.kept, self.checks)
        report = build_report(
            self.rows,
            clean_rows,
            clean_by_split,
            quarantine,
            self.checks,
            self.unexpected_counts,
            self.failed,
            self.cfg,
        )
        return quarantine, report


def iter_tables(source: pq.ParquetFile, batch_rows: int) -> Iterable[pa.Table]:
    """The file's rows as tables of at most ``batch_rows`` rows (one empty table for no rows)."""
    schema = source.schema_arrow
    if source.metadata.num_rows == 0:
        yield schema.empty_table()
        return
    for batch in source.iter_batches(batch_rows):
        yield pa.Table.from_batches([batch], schema=schema)


def validate_parquet(
    input_path: Path, clean_path: Path, cfg: ValidateConfig, batch_rows: int = BATCH_ROWS
) -> ValidationResult:
    """Validate a parquet table batch by batch, streaming its clean rows to ``clean_path``.

    The result's ``clean`` is empty (the rows are on disk, with the input's schema); its
    ``quarantine`` and ``report`` are what :func:`~opensora_core.data.validation.validate` gives
    for the whole table.
    """
    source = pq.ParquetFile(input_path)
    schema = source.schema_arrow
    check_columns(schema.names)
    duplicates = find_duplicate_paths(
        lambda: (b.column(0).to_pandas() for b in source.iter_batches(batch_rows, columns=["path"]))
    )
    validator = BatchValidator(cfg, duplicates)
    splits: Counter[str] = Counter()
    clean_rows = 0
    clean_path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(clean_path, schema) as writer:
        for table in iter_tables(source, batch_rows):
            clean = table.filter(pa.array(validator.add(table.to_pandas())))
            writer.write_table(clean)
            clean_rows += clean.num_rows
            if "split" in schema.names:
                splits.update(count_by(clean.select(["split"]).to_pandas(), "split"))
    quarantine, report = validator.finish(clean_rows, dict(sorted(splits.items())))
    empty = pd.DataFrame(columns=[c for c in schema.names if c not in HELPER_COLUMNS])
    return ValidationResult(clean=empty, quarantine=quarantine, report=report)
