"""The validation report as a self-contained HTML page (inline CSS, no scripts)."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import pandas as pd

HTML_MAX_ROWS = 500
"""Quarantined rows listed in the HTML report (the parquet file holds all of them)."""

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
