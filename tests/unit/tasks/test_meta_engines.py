"""The meta stage in chunks and on Ray: the same table as one pandarallel pass, byte for byte."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from opensora_core.config import MetaConfig
from opensora_core.errors import EXIT_BAD_INPUT, InputError
from tasks.meta import main, meta
from tests.unit.tasks.test_meta import project  # noqa: F401  (the fixture: real clips, an index)

INDEX = "data/raw/index.csv"


def test_chunked_meta_equals_one_chunk(project: Path) -> None:  # noqa: F811
    one = meta(INDEX, "one.parquet", MetaConfig(num_workers=0, progress=False))
    chunked = meta(INDEX, "chunked.parquet", MetaConfig(num_workers=0, progress=False), chunk_rows=4)
    assert chunked.rows == one.rows == 6 and chunked.counts == one.counts
    pd.testing.assert_frame_equal(pd.read_parquet("chunked.parquet"), pd.read_parquet("one.parquet"))
    meta(INDEX, "one.csv", MetaConfig(num_workers=0, progress=False))
    meta(INDEX, "chunked.csv", MetaConfig(num_workers=0, progress=False), chunk_rows=4)
    assert Path("chunked.csv").read_text() == Path("one.csv").read_text()


def test_header_only_index_is_refused_in_chunks(project: Path) -> None:  # noqa: F811
    Path("empty.csv").write_text("path,text,split\n")
    with pytest.raises(InputError, match="header but no rows"):
        meta("empty.csv", "empty.parquet", MetaConfig(num_workers=0, progress=False), chunk_rows=4)
    assert not Path("empty.parquet").exists()


def test_unknown_engine_exits_2_naming_the_key(project: Path, capsys) -> None:  # noqa: F811
    assert main(["--set", "meta.engine=spark", "-q"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "meta.engine" in err and "spark" in err
    assert not Path("data/meta/meta.parquet").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed: pip install -e '.[ray]' (make setup must install it for this test)",
)
def test_ray_engine_gives_the_pandarallel_table(project: Path) -> None:  # noqa: F811
    import ray

    pandarallel = MetaConfig(num_workers=2, progress=False)
    on_ray = MetaConfig(num_workers=2, progress=False, engine="ray")
    meta(INDEX, "pandarallel.parquet", pandarallel, chunk_rows=4)
    # meta starts a local Ray cluster of num_workers CPUs, runs every chunk on it, stops it.
    summary = meta(INDEX, "ray.parquet", on_ray, chunk_rows=4)
    assert not ray.is_initialized()
    assert summary.counts["ok"] == 3 and summary.rows == 6
    assert Path("ray.parquet").read_bytes() == Path("pandarallel.parquet").read_bytes()
