"""Stage ``shard``: split the clean table into parquet shards plus ``manifest.json``.

Every clean row lands in exactly one ``data/shards/shard-NNNNN.parquet``; the order depends on
the rows and ``shard.seed`` only. Training reads the shards with
:class:`opensora_core.data.shards.ShardReader`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config, ShardConfig
from opensora_core.data.shards import BATCH_ROWS, BUCKET_ROWS, MANIFEST, write_shards_from_parquet
from opensora_core.errors import InputError
from opensora_core.tracking import NullRun, start_stage_run
from tasks.validate import check_parquet


def run_shard(
    input_path: Path,
    output_dir: Path,
    cfg: ShardConfig,
    run: NullRun | None = None,
    progress: bool = True,
    batch_rows: int = BATCH_ROWS,
    bucket_rows: int = BUCKET_ROWS,
) -> str:
    """Shard ``input_path`` into ``output_dir``, log counts and the manifest; returns the summary.

    The table is streamed (``batch_rows`` rows at a time, ``bucket_rows`` sorted in memory).
    """
    check_parquet(input_path)
    manifest = write_shards_from_parquet(
        input_path,
        output_dir,
        cfg,
        source=str(input_path),
        progress=progress,
        batch_rows=batch_rows,
        bucket_rows=bucket_rows,
    )
    if run is not None:
        metrics = {"rows": manifest["num_rows"], "shards": manifest["num_shards"]}
        metrics.update({f"rows.{split}": n for split, n in manifest["rows_per_split"].items()})
        run.log_metrics(metrics)
        run.set_tags({"data.content_hash": manifest["content_hash"]})
        run.log_artifact(output_dir / MANIFEST, "shards")
    splits = ", ".join(f"{split}: {n}" for split, n in manifest["rows_per_split"].items())
    return f"{manifest['num_rows']} rows in {manifest['num_shards']} shards ({splits}) -> {output_dir}"


def stage(args: argparse.Namespace, cfg: Config) -> str:
    if not Path(args.input).is_file():
        raise InputError(f"input table not found: {args.input} (run the validate stage first)")
    params = {"shard": vars(cfg.shard), "input": args.input}
    with start_stage_run("shard", cfg.tracking, params=params) as run:
        return run_shard(Path(args.input), Path(args.output), cfg.shard, run, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("Split the clean metadata table into parquet shards with a manifest.", prog="shard")
    parser.add_argument("--input", default="data/meta/clean.parquet", help="clean table (parquet)")
    parser.add_argument("--output", default="data/shards", help="shard folder (stale shards are removed)")
    return run_cli(parser, argv, stage)


if __name__ == "__main__":
    sys.exit(main())
