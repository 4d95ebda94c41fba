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
import html
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
from opensora_core.errors import GateFailed, InputError

log = logging.getLogger(__name__)

ROW_ID = "_row_id"
TEXT_LENGTH = "_text_length"
KEPT_ROW = "_kept_row"
"""Set on quarantined records only: the row id of the clean occurrence of a duplicated path."""
HELPER_COLUMNS = (ROW_ID, TEXT_LENGTH)
REQUIRED_COLUMNS = ("path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "status")
QUARANTINE_COLUMNS = ("input_row", "failed_expectations", "reason")
HTML_MAX_ROWS = 500
"""Quarantined rows listed in the HTML report (the parquet file holds all of them)."""
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


def prepare_table(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` with the helper columns the suite reads (row id, stripped caption length)."""
    missing = [col for col in REQUIRED_COLUMNS if col not in table.columns]
    if missing:
        raise InputError(
            f"metadata table lacks column(s) {', '.join(missing)}; it has: {', '.join(map(str, table.columns))}"
        )
    clash = [col for col in (*HELPER_COLUMNS, *QUARANTINE_COLUMNS) if col in table.columns]
    if clash:
        raise InputError(f"metadata table has reserved column(s) {', '.join(clash)}")
    frame = table.reset_index(drop=True).copy()
    frame[ROW_ID] = np.arange(len(frame), dtype=np.int64)
    frame[TEXT_LENGTH] = frame["text"].map(lambda t: float(len(t.strip())) if isinstance(t, str) else np.nan)
    return frame


def run_suite(frame: pd.DataFrame, checks: list[Check]) -> dict[str, list[int]]:
    """Run the GX suite on ``frame``; returns check name -> row ids of its unexpected rows."""
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


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def validate(table: pd.DataFrame, cfg: ValidateConfig) -> ValidationResult:
    """Split the metadata ``table`` into clean and quarantined rows and build the report.

    Raises :class:`InputError` when required columns are missing. The gate is separate
    (:func:`check_gate`), so that a caller can write the outputs before it fails.
    """
    # 1. Run the suite on a copy with the helper columns.
    frame = prepare_table(table)
    checks = build_checks(cfg)
    unexpected = run_suite(frame, checks)

    # 2. Failed expectations per row id, in suite order.
    failed: dict[int, list[str]] = {}
    for chk in checks:
        for row_id in unexpected[chk.name]:
            failed.setdefault(row_id, []).append(chk.name)

    # 3. Duplicate policy: the first occurrence that passes everything else stays clean.
    kept: dict[Any, int] = {}
    for row_id in unexpected["path_unique"]:
        path = frame.at[row_id, "path"]
        if failed[row_id] == ["path_unique"] and path not in kept:
            kept[path] = row_id
            del failed[row_id]

    # 4. Route rows by row id.
    bad = frame[ROW_ID].isin(list(failed))
    clean = frame.loc[~bad].drop(columns=list(HELPER_COLUMNS)).reset_index(drop=True)
    quarantine = frame.loc[bad].copy()
    by_name = {chk.name: chk for chk in checks}
    records = quarantine.to_dict("records")
    for rec in records:
        rec[KEPT_ROW] = kept.get(rec["path"])
    quarantine["input_row"] = quarantine[ROW_ID]
    quarantine["failed_expectations"] = [",".join(failed[r[ROW_ID]]) for r in records]
    quarantine["reason"] = ["; ".join(by_name[n].reason(r) for n in failed[r[ROW_ID]]) for r in records]
    quarantine = quarantine.drop(columns=list(HELPER_COLUMNS)).reset_index(drop=True)

    report = build_report(frame, clean, quarantine, checks, unexpected, failed, cfg)
    return ValidationResult(clean=clean, quarantine=quarantine, report=report)


def build_report(
    frame: pd.DataFrame,
    clean: pd.DataFrame,
    quarantine: pd.DataFrame,
    checks: list[Check],
    unexpected: dict[str, list[int]],
    failed: dict[int, list[str]],
    cfg: ValidateConfig,
) -> dict[str, Any]:
    """The JSON-able validation report: counts, expectations, thresholds, gate result."""
    import great_expectations as gx

    rows = len(frame)
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
            "success": not unexpected[chk.name],
            "unexpected_count": len(unexpected[chk.name]),
            "quarantined_count": quarantined_by[chk.name],
        }
        for chk in checks
    ]
    top = sorted(((n, k) for n, k in quarantined_by.items() if k), key=lambda item: (-item[1], item[0]))
    return {
        "rows": rows,
        "clean": len(clean),
        "quarantined": len(quarantine),
        "bad_fraction": bad_fraction,
        "max_bad_fraction": cfg.max_bad_fraction,
        "passed": bad_fraction <= cfg.max_bad_fraction,
        "clean_by_split": _count_by(clean, "split"),
        "quarantined_by_status": _count_by(quarantine, "status"),
        "quarantined_by_expectation": dict(top),
        "expectations": expectations,
        "thresholds": dataclasses.asdict(cfg),
        "duplicate_policy": DUPLICATE_POLICY,
        "great_expectations_version": gx.__version__,
    }


def _count_by(table: pd.DataFrame, column: str) -> dict[str, int]:
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
    result: ValidationResult, clean_path: Path, quarantine_path: Path, report_dir: Path
) -> dict[str, Path]:
    """Write clean.parquet, quarantine.parquet, validation.json and validation.html."""
    paths = {
        "clean": Path(clean_path),
        "quarantine": Path(quarantine_path),
        "json": Path(report_dir) / "validation.json",
        "html": Path(report_dir) / "validation.html",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    result.clean.to_parquet(paths["clean"], index=False)
    result.quarantine.to_parquet(paths["quarantine"], index=False)
    paths["json"].write_text(json.dumps(result.report, indent=2, sort_keys=True) + "\n")
    paths["html"].write_text(render_html(result.report, result.quarantine))
    return paths


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { margin-bottom: 0.2rem; } .verdict { font-size: 1.2rem; font-weight: 600; }
.pass { color: #1a7f37; } .fail { color: #cf222e; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } tr.bad td:first-child { border-left: 4px solid #cf222e; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _table(headers: list[str], rows: list[list[Any]], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(
            f'<td class="num">{v}</td>' if isinstance(v, int | float) else f"<td>{html.escape(str(v))}</td>"
            for v in row
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: dict[str, Any], quarantine: pd.DataFrame) -> str:
    """A self-contained HTML page (inline CSS, no scripts) of the report and quarantined rows."""
    ok = report["passed"]
    verdict = "PASSED" if ok else "FAILED"
    summary = _table(
        ["rows", "clean", "quarantined", "bad fraction", "max bad fraction"],
        [
            [
                report["rows"],
                report["clean"],
                report["quarantined"],
                f"{100 * report['bad_fraction']:.1f}%",
                f"{100 * report['max_bad_fraction']:.1f}%",
            ]
        ],
    )
    expectations = _table(
        ["expectation", "applies to", "requirement", "GX type", "unexpected", "quarantined"],
        [
            [
                e["name"],
                e["applies_to"],
                e["description"],
                e["expectation_type"],
                e["unexpected_count"],
                e["quarantined_count"],
            ]
            for e in report["expectations"]
        ],
        ["" if e["success"] else "bad" for e in report["expectations"]],
    )
    splits = _table(["split", "clean rows"], [[k, v] for k, v in report["clean_by_split"].items()])
    thresholds = _table(
        ["key", "value"], [[f"validate.{k}", str(v)] for k, v in report["thresholds"].items()]
    )
    shown = quarantine.head(HTML_MAX_ROWS)
    columns = [
        c for c in ("input_row", "path", "status", "failed_expectations", "reason") if c in shown.columns
    ]
    rows = [[_cell(v) for v in rec] for rec in shown[columns].itertuples(index=False)]
    more = (
        f"<p>Showing the first {HTML_MAX_ROWS} of {len(quarantine)} rows; all are in quarantine.parquet.</p>"
        if len(quarantine) > HTML_MAX_ROWS
        else ""
    )
    quarantined = _table(columns, rows) if rows else "<p>No rows were quarantined.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Metadata validation</title><style>{_CSS}</style></head>
<body>
<h1>Metadata validation</h1>
<p class="verdict {"pass" if ok else "fail"}">{verdict}</p>
{summary}
<h2>Expectations</h2>
<p>Great Expectations {html.escape(str(report["great_expectations_version"]))}; duplicate paths:
{html.escape(report["duplicate_policy"])}.</p>
{expectations}
<h2>Clean rows per split</h2>
{splits}
<h2>Quarantined rows</h2>
{more}{quarantined}
<h2>Thresholds</h2>
{thresholds}
</body></html>
"""


def _cell(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)
