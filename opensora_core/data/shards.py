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
import tempfile
from bisect import bisect_right
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from opensora_core.config import ShardConfig
from opensora_core.data.video_io import file_sha256
from opensora_core.errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "opensora-shards/1"
SPLIT_COLUMN = "split"
RANK_COLUMN = "__shard_rank"
BATCH_ROWS = 100_000
"""Rows per record batch when streaming the input table."""
BUCKET_ROWS = 200_000
"""Most rows held in memory while writing shards (a run of consecutive shards, at least one)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


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
    """Write a table held in memory as shards: :func:`write_shards_from_parquet` on a parquet copy."""
    if "path" not in table.columns:
        raise InputError(
            f"the table to shard has no 'path' column; it has: {', '.join(map(str, table.columns))}"
        )
    with tempfile.TemporaryDirectory(prefix="shard-input-") as tmp:
        path = Path(tmp) / "table.parquet"
        table.reset_index(drop=True).to_parquet(path, index=False)
        return write_shards_from_parquet(path, out_dir, cfg, source=source, progress=progress)


def write_shards_from_parquet(
    input_path: str | Path,
    out_dir: str | Path,
    cfg: ShardConfig,
    *,
    source: str = "",
    progress: bool = True,
    batch_rows: int = BATCH_ROWS,
    bucket_rows: int = BUCKET_ROWS,
) -> dict[str, Any]:
    """Write the parquet table ``input_path`` as shards plus ``manifest.json`` into ``out_dir``.

    Memory is bounded by ``batch_rows`` and ``bucket_rows`` rows plus 40 bytes of sort key per
    row: (1) the table is streamed once for the keys, (2) streamed again, each row appended to
    the spill file of the bucket (a run of consecutive shards) it sorts into, (3) each bucket is
    sorted and written as its shards. Stale shards and manifest in ``out_dir`` are removed
    first; the manifest is written last, through a temporary file, so a folder with a manifest
    is always complete.
    """
    input_file = pq.ParquetFile(input_path)
    columns = input_file.schema_arrow.names
    if "path" not in columns:
        raise InputError(f"the table to shard has no 'path' column; it has: {', '.join(columns)}")
    num_rows = input_file.metadata.num_rows
    if num_rows == 0:
        raise InputError("the table to shard has no rows (did validation quarantine everything?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_shards(out_dir)
    if stale:
        log.info("removed %d stale shard file(s) from %s", stale, out_dir)

    # 1. Sort keys of every row; the shards' schema from the first batch as pandas converts it.
    keys, ties, schema = _sort_keys(input_file, cfg.seed, batch_rows)
    rank = np.empty(num_rows, dtype=np.int64)
    rank[np.lexsort((ties, *keys.T[::-1]))] = np.arange(num_rows)
    sizes = shard_sizes(num_rows, cfg)

    # 2. Spill every row into its bucket, 3. sort each bucket and write its shards.
    shards: list[dict[str, Any]] = []
    bar = tqdm(total=len(sizes), desc="shards", unit="shard", disable=not progress)
    with tempfile.TemporaryDirectory(prefix=".shard-spill-", dir=out_dir.parent) as spill:
        groups = _bucket_shards(sizes, bucket_rows)
        buckets = _spill_buckets(input_file, rank, groups, sizes, Path(spill), batch_rows)
        for bucket, shard_ids in buckets:
            rows = pa.ipc.open_file(bucket).read_all()
            rows = rows.take(pc.sort_indices(rows, [(RANK_COLUMN, "ascending")])).drop_columns([RANK_COLUMN])
            bucket.unlink()
            start = 0
            for index in shard_ids:
                shards.append(
                    _write_shard(rows.slice(start, sizes[index]), out_dir / shard_name(index), schema)
                )
                start += sizes[index]
                bar.update()
    bar.close()

    # 4. The manifest.
    manifest = _manifest(shards, columns, ties, schema, num_rows, cfg.seed, source)
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


def _manifest(
    shards: list[dict[str, Any]],
    columns: list[str],
    ties: np.ndarray,
    schema: pa.Schema,
    num_rows: int,
    seed: int,
    source: str,
) -> dict[str, Any]:
    """The manifest of written shards; the source hash is :func:`table_hash` from the row hashes."""
    splits: Counter[str] = Counter()
    for shard in shards:
        splits.update(shard["rows_per_split"])
    digest = hashlib.sha256(json.dumps([str(c) for c in columns]).encode())
    digest.update(np.sort(ties).tobytes())
    return {
        "format": FORMAT,
        "num_rows": num_rows,
        "num_shards": len(shards),
        "rows_per_split": dict(sorted(splits.items())) if SPLIT_COLUMN in columns else {},
        "columns": list(schema.names),
        "order": {"key": "sha256(f'{seed}:{path}'), ties by row hash", "seed": seed},
        "shards": shards,
        "content_hash": content_hash(shards),
        "source": {"path": source, "rows": num_rows, "table_hash": digest.hexdigest()},
    }


def path_keys(paths: pd.Series, seed: int) -> np.ndarray:
    """``sha256(f"{seed}:{path}")`` of each path as 4 big-endian uint64 words (they sort as the hex)."""
    digests = b"".join(hashlib.sha256(f"{seed}:{p}".encode()).digest() for p in paths.astype(str))
    return np.frombuffer(digests, dtype=">u8").reshape(-1, 4).astype(np.uint64)


def _batches(input_file: pq.ParquetFile, batch_rows: int) -> Any:
    """The file's rows as tables of at most ``batch_rows`` rows, with the file's schema."""
    for batch in input_file.iter_batches(batch_rows):
        yield pa.Table.from_batches([batch], schema=input_file.schema_arrow)


def _sort_keys(
    input_file: pq.ParquetFile, seed: int, batch_rows: int
) -> tuple[np.ndarray, np.ndarray, pa.Schema]:
    """Path keys (n, 4), row hashes (n,) and the shard schema, streaming the file once."""
    keys, ties, schema = [], [], None
    for table in _batches(input_file, batch_rows):
        frame = table.to_pandas()
        keys.append(path_keys(frame["path"], seed))
        ties.append(row_hashes(frame))
        if schema is None:
            schema = pa.Schema.from_pandas(frame, preserve_index=False)
    assert schema is not None  # the caller checked that the file has rows
    return np.concatenate(keys), np.concatenate(ties), schema


def _bucket_shards(sizes: list[int], bucket_rows: int) -> list[list[int]]:
    """Consecutive shards grouped into buckets of at most ``bucket_rows`` rows (one shard at least)."""
    buckets: list[list[int]] = [[]]
    rows = 0
    for index, size in enumerate(sizes):
        if buckets[-1] and rows + size > bucket_rows:
            buckets.append([])
            rows = 0
        buckets[-1].append(index)
        rows += size
    return buckets


def _spill_buckets(
    input_file: pq.ParquetFile,
    rank: np.ndarray,
    buckets: list[list[int]],
    sizes: list[int],
    spill: Path,
    batch_rows: int,
) -> list[tuple[Path, list[int]]]:
    """Append every row, with its rank, to the Arrow IPC file of its bucket; returns (file, shards)."""
    bucket_rows = [sum(sizes[i] for i in shard_ids) for shard_ids in buckets]
    firsts = np.cumsum([0, *bucket_rows])[:-1]
    paths = [spill / f"bucket-{i:05d}.arrow" for i in range(len(buckets))]
    schema = input_file.schema_arrow.append(pa.field(RANK_COLUMN, pa.int64()))
    writers = [pa.ipc.new_file(path, schema) for path in paths]
    try:
        start = 0
        for table in _batches(input_file, batch_rows):
            ranks = rank[start : start + table.num_rows]
            start += table.num_rows
            which = np.searchsorted(firsts, ranks, side="right") - 1
            table = table.append_column(RANK_COLUMN, pa.array(ranks))
            for b in np.unique(which):
                writers[b].write_table(table.filter(pa.array(which == b)))
    finally:
        for writer in writers:
            writer.close()
    return list(zip(paths, buckets, strict=True))


def _write_shard(rows: pa.Table, path: Path, schema: pa.Schema) -> dict[str, Any]:
    """Write one shard as pandas would convert its rows, with the shared ``schema``; its manifest entry."""
    part = pa.Table.from_pandas(rows.to_pandas(), schema=schema, preserve_index=False)
    part = part.replace_schema_metadata(schema.metadata)
    pq.write_table(part, path)
    return {
        "file": path.name,
        "rows": part.num_rows,
        "rows_per_split": _split_counts(part),
        "sha256": file_sha256(path),
    }


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
