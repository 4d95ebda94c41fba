"""validate and shard streamed in batches give exactly what the whole-table code gives.

The whole-table references are the in-memory ``validate`` (GX on the whole table at once) and
the shard order defined by ``shard_order`` on the whole table; the streamed runs use batches of
a few rows so that duplicates, quarantined rows and shards span batches.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opensora_core.config import ShardConfig, ValidateConfig
from opensora_core.data.shards import (
    MANIFEST,
    file_sha256,
    shard_name,
    shard_order,
    shard_sizes,
    table_hash,
    write_shards_from_parquet,
)
from opensora_core.data.validation import validate
from opensora_core.data.validation_batches import find_duplicate_paths, validate_parquet
from tests.unit.data.test_validation import make_meta_table


def messy_table() -> pd.DataFrame:
    """46 rows with bad and duplicated rows whose occurrences fall in different batches of 7."""
    table = make_meta_table(n_videos=40, n_stills=6)
    table.loc[3, "fps"] = 400.0
    # row 30 repeats row 2 (both pass: 2 stays, 30 is quarantined, in another batch)
    table.loc[30, "path"] = table.loc[2, "path"]
    # rows 5, 12 and 40 share a path; 5 is broken, so 12 (a later batch) stays clean and the
    # reason of 5 names it
    table.loc[[12, 40], "path"] = table.loc[5, "path"]
    table.loc[5, ["status", "error", "num_frames"]] = ["truncated", "cut short", math.nan]
    # two rows without a path (nulls are never duplicates), one empty caption
    table.loc[[8, 22], "path"] = None
    table.loc[17, "text"] = "   "
    return table


def test_duplicate_paths_found_across_batches() -> None:
    table = messy_table()
    batches = [table["path"].iloc[i : i + 7] for i in range(0, len(table), 7)]
    assert find_duplicate_paths(batches) == {table.loc[2, "path"], table.loc[12, "path"]}
    assert find_duplicate_paths([table["path"].iloc[:3]]) == set()


@pytest.mark.parametrize("batch_rows", [7, 1000])
def test_streamed_validation_equals_whole_table(tmp_path, batch_rows: int) -> None:
    table = messy_table()
    table.to_parquet(tmp_path / "meta.parquet", index=False)
    whole = validate(table, ValidateConfig())
    streamed = validate_parquet(
        tmp_path / "meta.parquet", tmp_path / "clean.parquet", ValidateConfig(), batch_rows
    )

    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "clean.parquet"), whole.clean)
    pd.testing.assert_frame_equal(streamed.quarantine, whole.quarantine)
    assert streamed.report == whole.report
    reasons = dict(zip(whole.quarantine["input_row"], whole.quarantine["reason"], strict=True))
    assert "input row 12 stays clean" in reasons[5] and "input row 12 stays clean" in reasons[40]
    assert "input row 2 stays clean" in reasons[30]
    assert sorted(reasons) == [3, 5, 8, 17, 22, 30, 40]
    path_unique = next(e for e in whole.report["expectations"] if e["name"] == "path_unique")
    assert path_unique["unexpected_count"] == 5  # every occurrence of the two duplicated paths


def test_streamed_validation_of_an_empty_table(tmp_path) -> None:
    table = make_meta_table().iloc[:0]
    table.to_parquet(tmp_path / "meta.parquet", index=False)
    streamed = validate_parquet(tmp_path / "meta.parquet", tmp_path / "clean.parquet", ValidateConfig(), 5)
    assert streamed.report == validate(table, ValidateConfig()).report
    assert pq.read_metadata(tmp_path / "clean.parquet").num_rows == 0


def reference_shards(table: pd.DataFrame, cfg: ShardConfig) -> list[pa.Table]:
    """The shards as the whole-table writer makes them: one conversion in order, then slices."""
    ordered = pa.Table.from_pandas(table.iloc[shard_order(table, cfg.seed)], preserve_index=False)
    starts = np.cumsum([0, *shard_sizes(len(table), cfg)])
    return [ordered.slice(a, b - a) for a, b in itertools.pairwise(starts)]


@pytest.mark.parametrize(("batch_rows", "bucket_rows"), [(7, 10), (1000, 1000)])
def test_streamed_shards_are_the_whole_table_shards(tmp_path, batch_rows: int, bucket_rows: int) -> None:
    table = messy_table()
    table.loc[[8, 22], "path"] = "data/raw/same.mp4"  # a duplicated path: ties by row hash
    table.to_parquet(tmp_path / "clean.parquet", index=False)
    cfg = ShardConfig(rows_per_shard=4, seed=3)
    out = tmp_path / "shards"
    manifest = write_shards_from_parquet(
        tmp_path / "clean.parquet", out, cfg, progress=False, batch_rows=batch_rows, bucket_rows=bucket_rows
    )
    expected = reference_shards(pd.read_parquet(tmp_path / "clean.parquet"), cfg)
    assert manifest["num_shards"] == len(expected) == 12
    for index, part in enumerate(expected):
        pq.write_table(part, tmp_path / "expected.parquet")
        assert file_sha256(out / shard_name(index)) == file_sha256(tmp_path / "expected.parquet"), index
    assert manifest["source"]["table_hash"] == table_hash(table)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, *(shard_name(i) for i in range(12))]
    assert not list(tmp_path.glob(".shard-spill-*"))
