"""Stage ``validate``: check the metadata table, split it into clean and quarantined rows.

Writes ``data/meta/clean.parquet``, ``data/meta/quarantine.parquet`` and the reports
``reports/validation.json`` / ``reports/validation.html``; then fails with exit code 3 when the
quarantined share exceeds ``validate.max_bad_fraction``. See :mod:`opensora_core.data.validation`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pyarrow.parquet as pq

from opensora_core.cli import build_parser, run_cli
from opensora_core.config import Config, ValidateConfig
from opensora_core.errors import InputError
from opensora_core.tracking import NullRun, start_stage_run

log = logging.getLogger("opensora.validate")


def check_parquet(path: Path) -> None:
    """Raise :class:`InputError` unless ``path`` is a readable parquet file (footer only)."""
    if not path.is_file():
        raise InputError(f"input table not found: {path} (run the meta stage first)")
    try:
        pq.ParquetFile(path).close()
    except Exception as exc:
        raise InputError(f"cannot read {path} as parquet: {exc}") from exc


def run_validate(
    input_path: Path,
    clean_path: Path,
    quarantine_path: Path,
    report_dir: Path,
    cfg: ValidateConfig,
    run: NullRun | None = None,
    batch_rows: int = 100_000,
) -> str:
    """Validate ``input_path``, write every output, log to ``run``, then apply the gate.

    The table is read in batches of ``batch_rows`` rows (memory bounded by the batch). Returns
    the summary line; raises :class:`GateFailed` after writing when the gate fails.
    """
    check_parquet(input_path)
    # Great Expectations is imported only once the input is known to exist.
    from opensora_core.data.validation import check_gate, write_validation
    from opensora_core.data.validation_batches import validate_parquet

    # The clean rows stream to a temporary file, renamed once every batch has passed the suite.
    tmp = clean_path.with_name(f".{clean_path.name}.tmp")
    try:
        result = validate_parquet(input_path, tmp, cfg, batch_rows=batch_rows)
        tmp.replace(clean_path)
    finally:
        tmp.unlink(missing_ok=True)
    paths = write_validation(result, clean_path, quarantine_path, report_dir, clean_written=True)
    r = result.report
    log.info(
        "clean rows -> %s, quarantined rows -> %s, reports -> %s", clean_path, quarantine_path, report_dir
    )
    if run is not None:
        metrics = {
            "rows": r["rows"],
            "clean_rows": r["clean"],
            "quarantined_rows": r["quarantined"],
            "bad_fraction": r["bad_fraction"],
            "passed": float(r["passed"]),
        }
        metrics.update({f"unexpected.{e['name']}": e["unexpected_count"] for e in r["expectations"]})
        run.log_metrics(metrics)
        run.log_artifact(paths["json"], "validation")
        run.log_artifact(paths["html"], "validation")
    check_gate(result)
    return result.summary()


def stage(args: argparse.Namespace, cfg: Config) -> str:
    input_path = Path(args.input)
    if not input_path.is_file():
        raise InputError(f"input table not found: {input_path} (run the meta stage first)")
    params = {"validate": vars(cfg.validate), "input": args.input}
    with start_stage_run("validate", cfg.tracking, params=params) as run:
        return run_validate(
            input_path, Path(args.clean), Path(args.quarantine), Path(args.report_dir), cfg.validate, run
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "Validate the metadata table with a Great Expectations suite; route failing rows to quarantine.",
        prog="validate",
    )
    parser.add_argument("--input", default="data/meta/meta.parquet", help="metadata table (parquet)")
    parser.add_argument("--clean", default="data/meta/clean.parquet", help="output: rows that passed")
    parser.add_argument(
        "--quarantine", default="data/meta/quarantine.parquet", help="output: rows that failed"
    )
    parser.add_argument("--report-dir", default="reports", help="output folder of validation.json/.html")
    return run_cli(parser, argv, stage)


if __name__ == "__main__":
    sys.exit(main())
