"""Parquet shards of the clean table: the writer, the manifest and the reader training uses.

Layout of a shard folder (``data/shards/``)::

    shard-00000.parquet  shard-00001.parquet  ...  manifest.json

Rows are ordered by ``sha256(f"{seed}:{path}")`` (ties, i.e. duplicated paths, by a hash of the
whole row), so the shards depend on the table's content and ``shard.seed`` only, never on the
input's row order. Every row lands in exactly one shard; the ``split`` column travels with it.

``manifest.json`` lists every shard (``file``, ``rows``, ``rows_per_split``, ``sha256``), the
total ``num_rows`` and ``rows_per_split``, the ``columns``, a ``content_hash`` over the shard
files and the ``source`` table's hash. :class:`ShardReader` gives random access to row ``i``
from the manifest's row counts, reading one shard at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from opensora_core.config import ShardConfig
from opensora_core.errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "opensora-shards/1"
SPLIT_COLUMN = "split"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def row_hashes(table: pd.DataFrame) -> np.ndarray:
    """One uint64 per row from pandas' stable row hashing (values only, not the index)."""
    return pd.util.hash_pandas_object(table, index=False).to_numpy(dtype=np.uint64)


def table_hash(table: pd.DataFrame) -> str:
    """SHA-256 of a table's columns and rows, independent of the row order."""
    digest = hashlib.sha256(json.dumps([str(c) for c in table.columns]).encode())
    digest.update(np.sort(row_hashes(table)).tobytes())
    return digest.hexdigest()


def content_hash(shards: list[dict[str, Any]]) -> str:
    """SHA-256 over the ordered shard entries (file name, rows, file sha256)."""
    lines = "".join(f"{s['file']}\t{s['rows']}\t{s['sha256']}\n" for s in shards)
    return hashlib.sha256(lines.encode()).hexdigest()


def shard_order(table: pd.DataFrame, seed: int) -> np.ndarray:
    """Row positions of ``table`` in shard order: by seeded path hash, ties by row hash."""
    keys = [hashlib.sha256(f"{seed}:{p}".encode()).hexdigest() for p in table["path"].astype(str)]
    ties = row_hashes(table)
    return np.lexsort((ties, np.array(keys)))


def shard_sizes(num_rows: int, cfg: ShardConfig) -> list[int]:
    """Rows per shard: ``rows_per_shard`` each (the last may hold fewer), or ``num_shards``
    near-equal shards when set (never more shards than rows)."""
    if cfg.num_shards > 0:
        k = min(cfg.num_shards, num_rows)
        return [num_rows // k + (1 if i < num_rows % k else 0) for i in range(k)]
    full, rest = divmod(num_rows, cfg.rows_per_shard)
    return [cfg.rows_per_shard] * full + ([rest] if rest else [])


def _split_counts(table: pa.Table) -> dict[str, int]:
    if SPLIT_COLUMN not in table.column_names:
        return {}
    counts = pd.Series(table.column(SPLIT_COLUMN).to_pylist(), dtype=object).fillna("").value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items())}


def remove_shards(out_dir: Path) -> int:
    """Delete the manifest and every ``*.parquet`` file directly in ``out_dir``; returns the count."""
    removed = 0
    manifest = out_dir / MANIFEST
    if manifest.exists():
        manifest.unlink()
    for path in out_dir.glob("*.parquet"):
        path.unlink()
        removed += 1
    return removed


def write_shards(
    table: pd.DataFrame,
    out_dir: str | Path,
    cfg: ShardConfig,
    *,
    source: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``table`` as parquet shards plus ``manifest.json`` into ``out_dir``; returns the manifest.

    Stale shards and manifest in ``out_dir`` are removed first; the manifest is written last,
    through a temporary file, so a folder with a manifest is always complete.
    """
    if "path" not in table.columns:
        raise InputError(
            f"the table to shard has no 'path' column; it has: {', '.join(map(str, table.columns))}"
        )
    if table.empty:
        raise InputError("the table to shard has no rows (did validation quarantine everything?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_shards(out_dir)
    if stale:
        log.info("removed %d stale shard file(s) from %s", stale, out_dir)

    # 1. Order rows by content, convert once so that every shard shares one schema.
    table = table.reset_index(drop=True)
    ordered = pa.Table.from_pandas(table.iloc[shard_order(table, cfg.seed)], preserve_index=False)

    # 2. Write the shards.
    shards: list[dict[str, Any]] = []
    start = 0
    sizes = shard_sizes(len(table), cfg)
    for index, rows in enumerate(tqdm(sizes, desc="shards", unit="shard", disable=not progress)):
        part = ordered.slice(start, rows)
        path = out_dir / shard_name(index)
        pq.write_table(part, path)
        shards.append(
            {
                "file": path.name,
                "rows": rows,
                "rows_per_split": _split_counts(part),
                "sha256": file_sha256(path),
            }
        )
        start += rows

    # 3. The manifest.
    manifest = {
        "format": FORMAT,
        "num_rows": len(table),
        "num_shards": len(shards),
        "rows_per_split": _split_counts(ordered),
        "columns": list(ordered.column_names),
        "order": {"key": "sha256(f'{seed}:{path}'), ties by row hash", "seed": cfg.seed},
        "shards": shards,
        "content_hash": content_hash(shards),
        "source": {"path": source, "rows": len(table), "table_hash": table_hash(table)},
    }
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise InputError(f"no shard manifest at {path} (run the shard stage first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class ShardReader:
    """Random access to the rows of a shard folder, optionally one split only.

    Row ``i`` is found from the manifest's cumulative row counts; only the shard holding it is
    read (whole, with pyarrow) and kept in a small LRU cache. Picklable: the cache is not
    pickled, so each DataLoader worker builds its own.
    """

    def __init__(self, root: str | Path, split: str | None = None, cache_shards: int = 4) -> None:
        self.root = Path(root)
        self.split = split
        self.cache_shards = max(1, cache_shards)
        self.manifest = read_manifest(self.root)
        known = self.manifest["rows_per_split"]
        if split is not None and split not in known:
            raise InputError(f"split {split!r} not in {self.root}; splits: {', '.join(known) or 'none'}")
        counts = [self._rows_in(s) for s in self.manifest["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def _rows_in(self, shard: dict[str, Any]) -> int:
        return shard["rows"] if self.split is None else shard["rows_per_split"].get(self.split, 0)

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def column_names(self) -> list[str]:
        return list(self.manifest["columns"])

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row ``i`` (in reader order) as a dict of Python values (nulls, e.g. a still's fps, are None)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        index = bisect_right(self._offsets, i) - 1
        return self._shard(index).slice(i - self._offsets[index], 1).to_pylist()[0]

    def _shard(self, index: int) -> pa.Table:
        table = self._cache.get(index)
        if table is not None:
            self._cache.move_to_end(index)
            return table
        table = self._read(index)
        self._cache[index] = table
        if len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return table

    def _read(self, index: int, columns: list[str] | None = None) -> pa.Table:
        path = self.root / self.manifest["shards"][index]["file"]
        if not path.is_file():
            raise InputError(f"shard file missing: {path}")
        if self.split is None:
            return pq.read_table(path, columns=columns)
        wanted = None if columns is None else list(dict.fromkeys([*columns, SPLIT_COLUMN]))
        table = pq.read_table(path, columns=wanted)
        table = table.filter(pc.equal(table.column(SPLIT_COLUMN), self.split))
        return table if columns is None else table.select(columns)

    def columns(self, names: list[str]) -> pd.DataFrame:
        """The given columns of every row, in reader order, reading only those columns."""
        unknown = [n for n in names if n not in self.manifest["columns"]]
        if unknown:
            raise KeyError(
                f"unknown column(s) {', '.join(unknown)}; columns: {', '.join(self.manifest['columns'])}"
            )
        parts = [
            self._read(index, list(names))
            for index, shard in enumerate(self.manifest["shards"])
            if self._rows_in(shard)
        ]
        if not parts:
            return pd.DataFrame(columns=list(names))
        return pa.concat_tables(parts).to_pandas()

    def verify(self) -> None:
        """Raise :class:`InputError` when the files disagree with the manifest.

        Checks: every listed shard exists, no unlisted ``*.parquet`` file, row counts (parquet
        footer), each file's sha256, the totals and the content hash.
        """
        problems = []
        listed = {s["file"] for s in self.manifest["shards"]}
        for shard in self.manifest["shards"]:
            path = self.root / shard["file"]
            if not path.is_file():
                problems.append(f"missing shard file {shard['file']}")
                continue
            digest = file_sha256(path)
            if digest != shard["sha256"]:
                problems.append(f"{shard['file']}: sha256 {digest[:12]}… != manifest {shard['sha256'][:12]}…")
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except Exception as exc:
                problems.append(f"{shard['file']}: unreadable parquet ({exc})")
                continue
            if rows != shard["rows"]:
                problems.append(f"{shard['file']}: {rows} rows != manifest {shard['rows']}")
        extra = sorted(p.name for p in self.root.glob("*.parquet") if p.name not in listed)
        if extra:
            problems.append(f"unlisted shard file(s) {', '.join(extra)}")
        total = sum(s["rows"] for s in self.manifest["shards"])
        if total != self.manifest["num_rows"]:
            problems.append(f"shards hold {total} rows, manifest says {self.manifest['num_rows']}")
        if content_hash(self.manifest["shards"]) != self.manifest["content_hash"]:
            problems.append("content_hash does not match the shard list")
        if problems:
            raise InputError(f"shard folder {self.root} does not match its manifest: " + "; ".join(problems))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return f"ShardReader({str(self.root)!r}{split}: {len(self)} rows in {len(self.manifest['shards'])} shards)"
