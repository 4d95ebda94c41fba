"""Data validation of the metadata table with a Great Expectations suite.

The suite (GX Core 1.x, ephemeral context) checks every row of the table the meta stage writes:

* every row: ``status`` present and ``ok``, ``path`` present and unique, caption present and at
  least ``min_text_length`` characters long after stripping;
* rows with ``status == ok`` (the others carry no usable geometry): ``num_frames``, ``height``,
  ``width``, ``aspect_ratio`` present and within the configured ranges;
* videos (``status == ok`` and ``num_frames > 1``): ``fps`` present and within range. Stills
  have no frame rate (NaN), so they are not checked for one.

Rows are routed by a synthetic row id (``_row_id``, the row's position in the input), never by
path, so duplicated paths are told apart. Duplicate policy: among the rows that share a path,
the first one (lowest row id) that passes every other expectation stays clean; every other
occurrence is quarantined with ``path_unique`` among its failed expectations. The report still
gives GX's own unexpected count for ``path_unique`` (every occurrence of a duplicated path).

Quarantined rows keep their columns plus ``input_row`` (the row id), ``failed_expectations``
(names joined by ``,``) and ``reason`` (readable sentences joined by ``; ``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from opensora_core.config import ValidateConfig
from opensora_core.data.validation_html import render_html
from opensora_core.errors import GateFailed, InputError

log = logging.getLogger(__name__)

ROW_ID = "_row_id"
TEXT_LENGTH = "_text_length"
KEPT_ROW = "_kept_row"
"""Set on quarantined records only: the row id of the clean occurrence of a duplicated path."""
HELPER_COLUMNS = (ROW_ID, TEXT_LENGTH)
REQUIRED_COLUMNS = ("path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "status")
QUARANTINE_COLUMNS = ("input_row", "failed_expectations", "reason")
DUPLICATE_POLICY = (
    "the first row of a duplicated path (lowest input row) that passes every other expectation "
    "stays clean; the other occurrences are quarantined"
)

Row = dict[str, Any]


@dataclass(frozen=True)
class Check:
    """One expectation of the suite, with the words the reports use for it."""

    name: str
    """Short id, used in ``failed_expectations`` and the reports."""
    description: str
    """What a passing row satisfies, in words."""
    reason: Callable[[Row], str]
    """A readable sentence for a row that fails it."""
    expectation: Any
    """The GX expectation object (its ``meta['name']`` is ``name``)."""
    scope: str
    """Which rows it applies to: ``all``, ``ok`` or ``videos``."""


@dataclass
class ValidationResult:
    """The outcome of :func:`validate`: the two row sets and the report."""

    clean: pd.DataFrame
    """Rows that passed, in input order, with the input's columns only."""
    quarantine: pd.DataFrame
    """Rows that failed, in input order, plus ``input_row``, ``failed_expectations``, ``reason``."""
    report: dict[str, Any]
    """Counts, per-expectation results, thresholds, bad fraction and ``passed``."""

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])

    def summary(self) -> str:
        r = self.report
        return f"{r['rows']} rows: {r['clean']} clean, {r['quarantined']} quarantined ({100 * r['bad_fraction']:.1f}%)"


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def _duplicate_reason(r: Row) -> str:
    kept = r.get(KEPT_ROW)
    where = f"input row {kept} stays clean" if kept is not None else "no occurrence passes every other check"
    return f"duplicate path {_fmt(r['path'])} ({where})"


class _CheckFactory:
    """Builds :class:`Check` objects on GX expectations, each scoped to a row condition."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.expectations.row_conditions import Column

        self.ex = gx.expectations
        is_ok = Column("status") == "ok"
        self.conditions = {"all": None, "ok": is_ok, "videos": is_ok & (Column("num_frames") > 1)}

    def check(
        self, name: str, scope: str, description: str, reason: Callable[[Row], str], kind: type, **kw: Any
    ) -> Check:
        expectation = kind(row_condition=self.conditions[scope], meta={"name": name}, **kw)
        return Check(name, description, reason, expectation, scope)

    def present(self, scope: str, col: str, why: str) -> Check:
        reason = f"{col} is missing ({why})"
        return self.check(
            f"{col}_present",
            scope,
            f"{col} is present",
            lambda r: reason,
            self.ex.ExpectColumnValuesToNotBeNull,
            column=col,
        )

    def between(self, name: str, scope: str, col: str, lo: float, hi: float, unit: str = "") -> Check:
        span = f"[{_fmt(lo)}, {_fmt(hi)}]{unit}"
        return self.check(
            name,
            scope,
            f"{col} within {span}",
            lambda r: f"{col} {_fmt(r[col])} outside {span}",
            self.ex.ExpectColumnValuesToBeBetween,
            column=col,
            min_value=lo,
            max_value=hi,
        )


def _status_reason(r: Row) -> str:
    error = r.get("error")
    detail = f": {error}" if isinstance(error, str) and error else ""
    return f"status is {_fmt(r['status'])}{detail}"


def _row_checks(f: _CheckFactory, cfg: ValidateConfig) -> list[Check]:
    """Checks on every row: a probe result, a unique path, a caption long enough."""
    n_text = cfg.min_text_length
    return [
        f.present("all", "status", "no probe result"),
        f.check(
            "status_ok",
            "all",
            "status is ok",
            _status_reason,
            f.ex.ExpectColumnValuesToBeInSet,
            column="status",
            value_set=["ok"],
        ),
        f.present("all", "path", "no file to read"),
        f.check(
            "path_unique",
            "all",
            "path is unique",
            _duplicate_reason,
            f.ex.ExpectColumnValuesToBeUnique,
            column="path",
        ),
        f.present("all", "text", "no caption"),
        f.check(
            "text_min_length",
            "all",
            f"text has >= {n_text} characters (stripped)",
            lambda r: f"text {_fmt(r['text'])} shorter than {n_text} characters (stripped)",
            f.ex.ExpectColumnValuesToBeBetween,
            column=TEXT_LENGTH,
            min_value=n_text,
        ),
    ]


def _geometry_checks(f: _CheckFactory, cfg: ValidateConfig) -> list[Check]:
    """Checks on probed rows (frames, size, aspect ratio) and on videos (frame rate)."""
    return [
        f.present("ok", "num_frames", "not probed"),
        f.check(
            "num_frames_min",
            "ok",
            "num_frames >= 1",
            lambda r: f"num_frames {_fmt(r['num_frames'])} < 1",
            f.ex.ExpectColumnValuesToBeBetween,
            column="num_frames",
            min_value=1,
        ),
        f.present("ok", "height", "not probed"),
        f.between("height_range", "ok", "height", cfg.min_side, cfg.max_side, " px"),
        f.present("ok", "width", "not probed"),
        f.between("width_range", "ok", "width", cfg.min_side, cfg.max_side, " px"),
        f.present("ok", "aspect_ratio", "not probed"),
        f.between("aspect_ratio_range", "ok", "aspect_ratio", cfg.min_aspect_ratio, cfg.max_aspect_ratio),
        f.present("videos", "fps", "a video without a frame rate"),
        f.between("fps_range", "videos", "fps", cfg.min_fps, cfg.max_fps),
    ]


def build_checks(cfg: ValidateConfig) -> list[Check]:
    """The expectations of the suite, in report order."""
    factory = _CheckFactory()
    return _row_checks(factory, cfg) + _geometry_checks(factory, cfg)


def prepare_table(table: pd.DataFrame, first_row: int = 0) -> pd.DataFrame:
    """A copy of ``table`` with the helper columns the suite reads (row id, stripped caption length).

    Row ids start at ``first_row``: a batch of a larger table keeps its rows' input positions.
    """
    check_columns(list(table.columns))
    frame = table.reset_index(drop=True).copy()
    frame[ROW_ID] = np.arange(first_row, first_row + len(frame), dtype=np.int64)
    frame[TEXT_LENGTH] = frame["text"].map(lambda t: float(len(t.strip())) if isinstance(t, str) else np.nan)
    return frame


def check_columns(columns: list[str]) -> None:
    """Raise :class:`InputError` when required columns are missing or reserved ones present."""
    missing = [col for col in REQUIRED_COLUMNS if col not in columns]
    if missing:
        raise InputError(
            f"metadata table lacks column(s) {', '.join(missing)}; it has: {', '.join(map(str, columns))}"
        )
    clash = [col for col in (*HELPER_COLUMNS, *QUARANTINE_COLUMNS) if col in columns]
    if clash:
        raise InputError(f"metadata table has reserved column(s) {', '.join(clash)}")


def build_suite_runner(checks: list[Check]) -> Callable[[pd.DataFrame], dict[str, list[int]]]:
    """One GX context, suite and validation definition, run on each frame it is given.

    The returned function maps a prepared frame to check name -> row ids of its unexpected rows.
    """
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch_definition = (
        context.data_sources.add_pandas("metadata")
        .add_dataframe_asset("meta")
        .add_batch_definition_whole_dataframe("whole_table")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="metadata"))
    for chk in checks:
        suite.add_expectation(chk.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="metadata", data=batch_definition, suite=suite)
    )

    def run(frame: pd.DataFrame) -> dict[str, list[int]]:
        results = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_ID]},
        )
        unexpected: dict[str, list[int]] = {}
        for res in results.results:
            name = res.expectation_config.meta["name"]
            if res.exception_info.get("raised_exception"):
                raise RuntimeError(
                    f"expectation {name} could not run: {res.exception_info.get('exception_message')}"
                )
            index_list = res.result.get("unexpected_index_list") or []
            unexpected[name] = sorted(int(item[ROW_ID]) for item in index_list)
        return unexpected

    return run


def run_suite(frame: pd.DataFrame, checks: list[Check]) -> dict[str, list[int]]:
    """Run the GX suite on ``frame``; returns check name -> row ids of its unexpected rows."""
    return build_suite_runner(checks)(frame)


def quarantine_records(
    bad: pd.DataFrame, failed: dict[int, list[str]], kept: dict[Any, int], checks: list[Check]
) -> pd.DataFrame:
    """The quarantined rows of a prepared frame with ``input_row``, ``failed_expectations``, ``reason``.

    ``kept`` maps a duplicated path to the row id of its clean occurrence (the reasons name it).
    """
    quarantine = bad.copy()
    by_name = {chk.name: chk for chk in checks}
    records = quarantine.to_dict("records")
    for rec in records:
        rec[KEPT_ROW] = kept.get(rec["path"])
    quarantine["input_row"] = quarantine[ROW_ID]
    quarantine["failed_expectations"] = [",".join(failed[r[ROW_ID]]) for r in records]
    quarantine["reason"] = ["; ".join(by_name[n].reason(r) for n in failed[r[ROW_ID]]) for r in records]
    return quarantine.drop(columns=list(HELPER_COLUMNS)).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def validate(table: pd.DataFrame, cfg: ValidateConfig) -> ValidationResult:
    """Split the metadata ``table`` into clean and quarantined rows and build the report.

    The whole table is one batch of :class:`~opensora_core.data.validation_batches.BatchValidator`
    (the stage streams a parquet file through it batch by batch). Raises :class:`InputError`
    when required columns are missing. The gate is separate (:func:`check_gate`), so that a
    caller can write the outputs before it fails.
    """
    from opensora_core.data.validation_batches import BatchValidator, find_duplicate_paths

    table = table.reset_index(drop=True)
    check_columns(list(table.columns))
    validator = BatchValidator(cfg, find_duplicate_paths([table["path"]]))
    keep = validator.add(table)
    clean = table.loc[keep].reset_index(drop=True)
    quarantine, report = validator.finish(len(clean), count_by(clean, "split"))
    return ValidationResult(clean=clean, quarantine=quarantine, report=report)


def build_report(
    rows: int,
    clean_rows: int,
    clean_by_split: dict[str, int],
    quarantine: pd.DataFrame,
    checks: list[Check],
    unexpected_counts: dict[str, int],
    failed: dict[int, list[str]],
    cfg: ValidateConfig,
) -> dict[str, Any]:
    """The JSON-able validation report: counts, expectations, thresholds, gate result."""
    import great_expectations as gx

    quarantined_by: dict[str, int] = {chk.name: 0 for chk in checks}
    for names in failed.values():
        for name in names:
            quarantined_by[name] += 1
    bad_fraction = len(quarantine) / rows if rows else 0.0
    expectations = [
        {
            "name": chk.name,
            "expectation_type": chk.expectation.expectation_type,
            "column": chk.expectation.column,
            "applies_to": chk.scope,
            "description": chk.description,
            "success": not unexpected_counts[chk.name],
            "unexpected_count": unexpected_counts[chk.name],
            "quarantined_count": quarantined_by[chk.name],
        }
        for chk in checks
    ]
    top = sorted(((n, k) for n, k in quarantined_by.items() if k), key=lambda item: (-item[1], item[0]))
    return {
        "rows": rows,
        "clean": clean_rows,
        "quarantined": len(quarantine),
        "bad_fraction": bad_fraction,
        "max_bad_fraction": cfg.max_bad_fraction,
        "passed": bad_fraction <= cfg.max_bad_fraction,
        "clean_by_split": clean_by_split,
        "quarantined_by_status": count_by(quarantine, "status"),
        "quarantined_by_expectation": dict(top),
        "expectations": expectations,
        "thresholds": dataclasses.asdict(cfg),
        "duplicate_policy": DUPLICATE_POLICY,
        "great_expectations_version": gx.__version__,
    }


def count_by(table: pd.DataFrame, column: str) -> dict[str, int]:
    if column not in table.columns or table.empty:
        return {}
    counts = table[column].fillna("<missing>").astype(str).value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items())}


def check_gate(result: ValidationResult) -> None:
    """Raise :class:`GateFailed` when the quarantined share exceeds ``max_bad_fraction``."""
    r = result.report
    if r["passed"]:
        return
    top = ", ".join(f"{name} ({count})" for name, count in list(r["quarantined_by_expectation"].items())[:3])
    raise GateFailed(
        f"validation gate failed: {r['quarantined']} of {r['rows']} rows quarantined "
        f"({100 * r['bad_fraction']:.1f}%) > validate.max_bad_fraction {100 * r['max_bad_fraction']:.1f}%; "
        f"top reasons: {top}"
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def write_validation(
    result: ValidationResult,
    clean_path: Path,
    quarantine_path: Path,
    report_dir: Path,
    *,
    clean_written: bool = False,
) -> dict[str, Path]:
    """Write clean.parquet (unless ``clean_written``: streamed already), quarantine.parquet,
    validation.json and validation.html."""
    paths = {
        "clean": Path(clean_path),
        "quarantine": Path(quarantine_path),
        "json": Path(report_dir) / "validation.json",
        "html": Path(report_dir) / "validation.html",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    if not clean_written:
        result.clean.to_parquet(paths["clean"], index=False)
    result.quarantine.to_parquet(paths["quarantine"], index=False)
    paths["json"].write_text(json.dumps(result.report, indent=2, sort_keys=True) + "\n")
    paths["html"].write_text(render_html(result.report, result.quarantine))
    return paths
