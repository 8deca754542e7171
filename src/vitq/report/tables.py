"""Generic table writers: aligned plain text for terminals, GitHub markdown, and CSV.

Every writer takes ``columns`` (header names) and ``rows`` (sequences of cell values, one per
column). Cells may be strings, ints, floats or ``None`` (an empty cell); floats are printed with
``precision`` decimals in text and markdown and at full precision in CSV.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitq.files import atomic_file

Row = Sequence[Any]


def format_value(value: Any, precision: int = 2) -> str:
    """One cell as text: ``None`` -> ``""``, floats with ``precision`` decimals (``inf``/``nan`` as such)."""
    if value is None:
        return ""
    if isinstance(value, float) and not isinstance(value, bool):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{precision}f}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numeric_columns(n_columns: int, rows: Sequence[Row]) -> list[bool]:
    """Per column: whether every non-empty cell is a number (such columns are right-aligned)."""
    numeric = []
    for i in range(n_columns):
        values = [row[i] for row in rows if row[i] is not None]
        numeric.append(bool(values) and all(_is_number(v) for v in values))
    return numeric


def _check_widths(columns: Sequence[str], rows: Sequence[Row]) -> None:
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, expected {len(columns)}")


def markdown_table(columns: Sequence[str], rows: Sequence[Row], precision: int = 2) -> str:
    """A GitHub markdown table (numeric columns right-aligned), ending with a newline.

    ``|`` inside a cell is escaped and newlines become spaces, so any text stays in its cell.
    """
    _check_widths(columns, rows)

    def cell(value: Any) -> str:
        return format_value(value, precision).replace("|", "\\|").replace("\n", " ")

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    separator = ["---:" if numeric else "---" for numeric in _numeric_columns(len(columns), rows)]
    lines = [line([cell(c) for c in columns]), line(separator)]
    lines += [line([cell(v) for v in row]) for row in rows]
    return "\n".join(lines) + "\n"


def text_table(columns: Sequence[str], rows: Sequence[Row], precision: int = 2) -> str:
    """An aligned plain-text table for the terminal (numeric columns right-aligned), ending with a newline."""
    _check_widths(columns, rows)
    cells = [[format_value(v, precision) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = _numeric_columns(len(columns), rows)

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(padded).rstrip()

    lines = [line(list(columns)), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, columns: Sequence[str], rows: Sequence[Row]) -> Path:
    """Write ``rows`` under a ``columns`` header to ``path`` (parents created); ``None`` -> empty cell."""
    _check_widths(columns, rows)
    path = Path(path)
    with atomic_file(path) as partial, partial.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return path
