"""Reading the CSV tables users hand to the CLIs (prompts, clip lists) with readable errors.

An empty file, a header with no rows, a missing column or blank cells are bad input (exit 2 via
:class:`~opensora_core.errors.InputError`), said in one sentence naming the file, never a pandas
traceback. pandas is imported lazily so light CLIs keep starting fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from opensora_core.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


def read_csv_table(
    path: Path, what: str, columns: Sequence[str] = (), *, one_of: Sequence[str] = ()
) -> pd.DataFrame:
    """The CSV at ``path`` as strings (an empty cell stays ``""``); ``what`` names it in errors.

    ``columns`` must all be present, ``one_of`` at least one of them. A file that is missing,
    unreadable, empty or has a header but no data rows raises InputError.
    """
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        # keep_default_na=False: a caption "NA" or "None" stays text, an empty cell stays "".
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{what} {path}: the file is empty (expected a header and rows)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path}: not a readable CSV: {exc}") from exc
    found = ", ".join(map(str, table.columns)) or "none"
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{what} {path}: missing column(s) {', '.join(missing)}; found: {found}")
    if one_of and not any(c in table.columns for c in one_of):
        raise InputError(f"{what} {path}: needs a {' or '.join(repr(c) for c in one_of)} column; found: {found}")
    if table.empty:
        raise InputError(f"{what} {path}: the CSV has a header but no rows")
    return table


def blank_rows(values: pd.Series) -> list[int]:
    """1-based data-row numbers of the cells of ``values`` that are empty or only whitespace."""
    return [int(i) + 1 for i in values.index[values.str.strip() == ""]]
