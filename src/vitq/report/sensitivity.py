"""The sensitivity report: a markdown table sorted by sensitivity, a JSON list and a bar plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from vitq.eval.sensitivity import PointSensitivity
from vitq.files import write_json, write_text
from vitq.report.plots import plot_sensitivity
from vitq.report.tables import markdown_table

#: the report's file names inside its folder
TABLE_FILE, JSON_FILE, PLOT_FILE = "sensitivity.md", "sensitivity.json", "sensitivity.png"
#: bars in the plot (the most sensitive points; the table has them all)
PLOTTED = 40
COLUMNS = ["rank", "point", "role", "quantizer", "KL to float", "top-1 %", "SQNR dB", "tr(H)/n", "HAWQ Ω"]


def ranked(results: Sequence[PointSensitivity]) -> list[PointSensitivity]:
    """Most sensitive first: by KL to the float prediction, ties in model order."""
    return sorted(results, key=lambda r: -r.kl)


def rows(results: Sequence[PointSensitivity]) -> list[list]:
    def number(value: float | None, fmt: str) -> str:
        return "" if value is None else ("inf" if math.isinf(value) else format(value, fmt))

    return [[rank, r.slot, r.role, r.quantizer, number(r.kl, ".3g"), number(r.top1, ".2f"),
             number(r.sqnr_db, ".1f"), number(r.hessian_trace, ".3g"), number(r.hawq, ".3g")]
            for rank, r in enumerate(ranked(results), 1)]


def write_sensitivity(folder: Path, results: Sequence[PointSensitivity], header: Sequence[str],
                      title: str) -> list[Path]:
    """Write the table (``header`` lines above it), the JSON (model order) and the plot into ``folder``."""
    table = "\n".join([f"# {title}", "", *header, "", markdown_table(COLUMNS, rows(results)), ""])
    write_text(folder / TABLE_FILE, table)
    write_json(folder / JSON_FILE, [asdict(r) | {"sqnr_db": r.sqnr_db if math.isfinite(r.sqnr_db) else None}
                                    for r in results])
    shown = ranked(results)[:PLOTTED]
    plot_sensitivity(folder / PLOT_FILE, [r.slot.removesuffix("_quantizer") for r in shown], [r.kl for r in shown],
                     [r.role == "weight" for r in shown], title=f"{title}: the {len(shown)} most sensitive points")
    return [folder / TABLE_FILE, folder / JSON_FILE, folder / PLOT_FILE]


__all__ = ["COLUMNS", "JSON_FILE", "PLOT_FILE", "TABLE_FILE", "ranked", "rows", "write_sensitivity"]
