"""Shard writer, manifest and ShardReader: every row exactly once, content-defined order."""

from __future__ import annotations

import json
import pickle

import pandas as pd
import pyarrow.parquet as pq
import pytest

from opensora_core.config import ShardConfig
from opensora_core.data.shards import MANIFEST, ShardReader, shard_sizes, table_hash, write_shards
from opensora_core.errors import InputError
from tests.unit.data.test_validation import make_meta_table


@pytest.fixture
def table() -> pd.DataFrame:
    return make_meta_table(n_videos=23, n_stills=4)  # 27 rows, 7 of them val


def by_path(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("path").reset_index(drop=True)


def test_round_trip_every_row_exactly_once(tmp_path, table) -> None:
    manifest = write_shards(table, tmp_path, ShardConfig(rows_per_shard=8), progress=False)
    files = sorted(p.name for p in tmp_path.glob("*.parquet"))
    assert files == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert [s["rows"] for s in manifest["shards"]] == [8, 8, 8, 3]
    on_disk = pd.concat([pd.read_parquet(tmp_path / f) for f in files], ignore_index=True)
    assert len(on_disk) == len(table) and on_disk["path"].is_unique
    pd.testing.assert_frame_equal(by_path(on_disk), by_path(table))
    assert manifest["num_rows"] == 27 and manifest["rows_per_split"] == {"train": 20, "val": 7}
    assert sum(s["rows_per_split"].get("val", 0) for s in manifest["shards"]) == 7
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest
    assert manifest["source"]["table_hash"] == table_hash(table)


def test_order_does_not_depend_on_input_order(tmp_path, table) -> None:
    first = write_shards(table, tmp_path / "a", ShardConfig(rows_per_shard=5), progress=False)
    shuffled = table.sample(frac=1.0, random_state=3)
    assert not shuffled["path"].equals(table["path"])
    second = write_shards(shuffled, tmp_path / "b", ShardConfig(rows_per_shard=5), progress=False)
    assert first["content_hash"] == second["content_hash"]
    assert first["source"]["table_hash"] == second["source"]["table_hash"]
    for a, b in zip(first["shards"], second["shards"]):
        assert (tmp_path / "a" / a["file"]).read_bytes() == (tmp_path / "b" / b["file"]).read_bytes()
    other_seed = write_shards(table, tmp_path / "c", ShardConfig(rows_per_shard=5, seed=1), progress=False)
    assert other_seed["content_hash"] != first["content_hash"]
    assert list(ShardReader(tmp_path / "c").columns(["path"])["path"]) != list(
        ShardReader(tmp_path / "a").columns(["path"])["path"]
    )


def test_duplicate_paths_still_order_independent(tmp_path, table) -> None:
    table.loc[5, "path"] = table.loc[4, "path"]
    a = write_shards(table, tmp_path / "a", ShardConfig(), progress=False)
    b = write_shards(table.iloc[::-1], tmp_path / "b", ShardConfig(), progress=False)
    assert a["content_hash"] == b["content_hash"] and a["num_rows"] == 27


def test_shard_sizes() -> None:
    assert shard_sizes(10, ShardConfig(rows_per_shard=4)) == [4, 4, 2]
    assert shard_sizes(8, ShardConfig(rows_per_shard=4)) == [4, 4]
    assert shard_sizes(10, ShardConfig(num_shards=3)) == [4, 3, 3]
    assert shard_sizes(2, ShardConfig(num_shards=5)) == [1, 1]


def test_num_shards_overrides_rows_per_shard(tmp_path, table) -> None:
    manifest = write_shards(table, tmp_path, ShardConfig(rows_per_shard=2, num_shards=3), progress=False)
    assert [s["rows"] for s in manifest["shards"]] == [9, 9, 9]
    assert len(list(tmp_path.glob("*.parquet"))) == 3


def test_stale_shards_are_removed(tmp_path, table) -> None:
    write_shards(table, tmp_path, ShardConfig(rows_per_shard=4), progress=False)
    (tmp_path / "leftover.parquet").write_bytes(b"old")
    write_shards(table, tmp_path, ShardConfig(rows_per_shard=20), progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    ShardReader(tmp_path).verify()


def test_empty_or_pathless_table_is_an_input_error(tmp_path, table) -> None:
    with pytest.raises(InputError, match="no rows"):
        write_shards(table.iloc[:0], tmp_path, ShardConfig(), progress=False)
    with pytest.raises(InputError, match="path"):
        write_shards(table.drop(columns=["path"]), tmp_path, ShardConfig(), progress=False)


def test_reader_random_access_matches_columns(tmp_path, table) -> None:
    write_shards(table, tmp_path, ShardConfig(rows_per_shard=4), progress=False)
    reader = ShardReader(tmp_path, cache_shards=2)
    assert len(reader) == len(table)
    frame = reader.columns(list(table.columns))
    pd.testing.assert_frame_equal(by_path(frame), by_path(table))
    for i in [0, 5, 26, 3, 13, 4, 25, 0]:  # jumps across shards, beyond the cache size
        row = reader[i]
        assert row["path"] == frame["path"].iloc[i] and row["text"] == frame["text"].iloc[i]
        assert row["height"] == frame["height"].iloc[i]
    assert len(reader._cache) <= 2
    assert reader[-1] == reader[len(reader) - 1]
    with pytest.raises(IndexError):
        reader[len(reader)]
    still = next(reader[i] for i in range(len(reader)) if reader[i]["num_frames"] == 1)
    assert still["fps"] is None


def test_reader_split_filter(tmp_path, table) -> None:
    write_shards(table, tmp_path, ShardConfig(rows_per_shard=4), progress=False)
    val = ShardReader(tmp_path, split="val")
    expected = table[table["split"] == "val"]
    assert len(val) == len(expected) == 7
    rows = [val[i] for i in range(len(val))]
    assert {r["split"] for r in rows} == {"val"}
    assert sorted(r["path"] for r in rows) == sorted(expected["path"])
    paths = val.columns(["path"])
    assert list(paths.columns) == ["path"] and list(paths["path"]) == [r["path"] for r in rows]
    train = ShardReader(tmp_path, split="train")
    assert len(train) + len(val) == len(table)
    everything = list(ShardReader(tmp_path).columns(["path"])["path"])
    assert [p for p in everything if p in set(paths["path"])] == list(paths["path"])  # same relative order
    with pytest.raises(InputError, match="test"):
        ShardReader(tmp_path, split="test")


def test_columns_reads_only_those_columns(tmp_path, table) -> None:
    write_shards(table, tmp_path, ShardConfig(rows_per_shard=10), progress=False)
    frame = ShardReader(tmp_path).columns(["text", "num_frames"])
    assert list(frame.columns) == ["text", "num_frames"] and len(frame) == 27
    with pytest.raises(KeyError, match="nope"):
        ShardReader(tmp_path).columns(["nope"])


def test_reader_is_picklable(tmp_path, table) -> None:
    write_shards(table, tmp_path, ShardConfig(rows_per_shard=4), progress=False)
    reader = ShardReader(tmp_path, split="train")
    first = reader[3]
    clone = pickle.loads(pickle.dumps(reader))
    assert len(clone._cache) == 0 and clone[3] == first and len(clone) == len(reader)
    assert clone.content_hash == reader.content_hash == reader.manifest["content_hash"]


def test_verify_detects_tampering(tmp_path, table) -> None:
    write_shards(table, tmp_path, ShardConfig(rows_per_shard=8), progress=False)
    reader = ShardReader(tmp_path)
    reader.verify()

    # Rewrite one shard without its last row: checksum and row count disagree.
    shard = tmp_path / "shard-00001.parquet"
    original = shard.read_bytes()
    part = pq.read_table(shard)
    pq.write_table(part.slice(0, part.num_rows - 1), shard)
    with pytest.raises(
        InputError, match=r"shard-00001.parquet: sha256.*shard-00001.parquet: 7 rows != manifest 8"
    ):
        reader.verify()
    shard.write_bytes(original)
    reader.verify()

    shard.unlink()
    with pytest.raises(InputError, match=r"missing shard file shard-00001\.parquet"):
        reader.verify()
    shard.write_bytes(original)

    (tmp_path / "shard-00009.parquet").write_bytes(original)
    with pytest.raises(InputError, match="unlisted shard file"):
        reader.verify()


def test_missing_manifest_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="manifest"):
        ShardReader(tmp_path)
