"""The ``vitq compare`` report: methods x bit settings x seeds as markdown, CSV and a plot.

Each run is one :class:`CompareRun` (a method at a bit setting on one seed's evaluation images,
or the float model with ``setting == "float"``). The float top-1 of the same seed is stored with
every run, so the drop from float is *paired*: float minus method on the same images.

``method`` is the method's *label* as given to ``vitq compare --methods``, options included
(``dopq-vit[softmax=log2;target=mean]``), so two variants of one method are two rows and two plot lines.
With a *reference* label, every run also gets the paired difference top-1 minus the reference's top-1
at the same bit setting and seed (the same evaluation images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from vitq.files import write_text
from vitq.report.plots import plot_compare
from vitq.report.stats import format_mean_std, mean_std
from vitq.report.tables import markdown_table, write_csv

FLOAT = "float"


@dataclass(frozen=True)
class CompareRun:
    """Raw numbers of one method x bit setting x seed run (top-1/top-5 in percent); ``method`` is its label."""

    method: str
    setting: str  # "W8A8", ... or "float"
    seed: int
    n_images: int
    top1: float
    top5: float
    float_top1: float
    calib_seconds: float
    eval_seconds: float
    size_mb: float

    @property
    def drop(self) -> float:
        """Top-1 lost against float on the same images (percentage points)."""
        return self.float_top1 - self.top1


@dataclass(frozen=True)
class FailedRun:
    """A method x bit setting x seed run that raised: its one-line ``error``; ``internal`` when it was a bug (or a
    lost worker) rather than a problem with the input."""

    method: str
    setting: str
    seed: int
    error: str
    internal: bool = False


CSV_COLUMNS = [f.name for f in fields(CompareRun)] + ["drop"]


RunKey = tuple[str, str, int]


def _key(run: CompareRun) -> RunKey:
    return run.method, run.setting, run.seed


def paired_deltas(runs: Sequence[CompareRun], reference: str) -> dict[RunKey, float]:
    """Per (method, setting, seed): top-1 minus ``reference``'s top-1 at the same setting and seed.

    Runs without a reference run at their setting and seed (the float runs) are left out.
    """
    ref = {(r.setting, r.seed): r for r in runs if r.method == reference}
    if not ref:
        raise ValueError(f"no runs of the reference {reference!r}")
    deltas = {}
    for run in runs:
        other = ref.get((run.setting, run.seed))
        if other is None:
            continue
        if other.n_images != run.n_images:
            raise ValueError(f"{_key(run)} and {reference!r} were evaluated on different images")
        deltas[_key(run)] = run.top1 - other.top1
    return deltas


def _paired_cell(method: str, group: Sequence[CompareRun], deltas: dict[RunKey, float], reference: str) -> str | None:
    """The summary cell of the paired difference: mean ± std over seeds, "—" for the reference itself."""
    if method == reference:
        return "—"
    values = [deltas[_key(r)] for r in group if _key(r) in deltas]
    return format_mean_std(values) if values else None


def _groups(runs: Sequence[CompareRun]) -> dict[tuple[str, str], list[CompareRun]]:
    """Runs grouped by (method, setting), in first-seen order."""
    groups: dict[tuple[str, str], list[CompareRun]] = {}
    for run in runs:
        groups.setdefault((run.method, run.setting), []).append(run)
    return groups


def summary_rows(runs: Sequence[CompareRun], reference: str | None = None) -> list[list]:
    """One row per method x setting: top-1 mean ± std, top-5 mean, drop mean ± std, calibration s mean,
    and with a ``reference`` label the paired top-1 difference to it (mean ± std)."""
    deltas = paired_deltas(runs, reference) if reference else {}
    rows = []
    for (method, setting), group in _groups(runs).items():
        row = [method, setting, len(group), format_mean_std([r.top1 for r in group]),
               mean_std([r.top5 for r in group])[0], format_mean_std([r.drop for r in group]),
               mean_std([r.calib_seconds for r in group])[0]]
        rows.append(row + ([_paired_cell(method, group, deltas, reference)] if reference else []))
    return rows


SUMMARY_COLUMNS = ["method", "bits", "seeds", "top-1 % (mean ± std)", "top-5 % (mean)",
                   "drop from float (mean ± std)", "calibration s (mean)"]
PER_SEED_COLUMNS = ["method", "bits", "seed", "images", "top-1 %", "top-5 %", "float top-1 %", "drop",
                    "calibration s", "eval s", "size MB"]
CSV_PAIRED_COLUMNS = ["reference", "delta_top1_vs_reference"]


def summary_columns(reference: str | None = None) -> list[str]:
    """:data:`SUMMARY_COLUMNS`, plus the paired-difference column with a ``reference`` label."""
    return SUMMARY_COLUMNS + ([f"Δ top-1 vs {reference} (paired)"] if reference else [])


def per_seed_columns(reference: str | None = None) -> list[str]:
    """:data:`PER_SEED_COLUMNS`, plus the per-seed difference column with a ``reference`` label."""
    return PER_SEED_COLUMNS + ([f"Δ top-1 vs {reference}"] if reference else [])


def per_seed_rows(runs: Sequence[CompareRun], reference: str | None = None) -> list[list]:
    """The raw numbers, one row per run (and its difference to ``reference``, empty where there is none)."""
    deltas = paired_deltas(runs, reference) if reference else {}
    return [[r.method, r.setting, r.seed, r.n_images, r.top1, r.top5, r.float_top1, r.drop,
             r.calib_seconds, r.eval_seconds, r.size_mb] + ([deltas.get(_key(r))] if reference else [])
            for r in runs]


def csv_rows(runs: Sequence[CompareRun], reference: str | None = None) -> tuple[list[str], list[list]]:
    """CSV columns and rows: every :class:`CompareRun` field and ``drop``, plus ``reference`` and
    ``delta_top1_vs_reference`` (empty for the float runs) with a ``reference`` label."""
    if not reference:
        return CSV_COLUMNS, [list(asdict(r).values()) + [r.drop] for r in runs]
    deltas = paired_deltas(runs, reference)
    return (CSV_COLUMNS + CSV_PAIRED_COLUMNS,
            [list(asdict(r).values()) + [r.drop, reference, deltas.get(_key(r))] for r in runs])


FAILED_COLUMNS = ["method", "bits", "seed", "error"]


def compare_markdown(title: str, meta: Sequence[tuple[str, str]], runs: Sequence[CompareRun],
                     plot_name: str | None = None, reference: str | None = None,
                     failures: Sequence[FailedRun] = ()) -> str:
    """The markdown report: title, ``meta`` as a bullet list, summary table, per-seed table, the failed runs (if
    any: left out of the tables), plot."""
    parts = [f"# {title}\n", "\n".join(f"- {key}: {value}" for key, value in meta) + "\n",
             "## Summary (mean ± std over seeds)\n"]
    if reference:
        parts.append(f"Δ top-1 vs {reference} (paired): per seed, top-1 minus the top-1 of {reference} at the same "
                     "bit setting on the same images, then mean ± std over seeds.\n")
    parts += [markdown_table(summary_columns(reference), summary_rows(runs, reference)),
              "## Per seed\n", markdown_table(per_seed_columns(reference), per_seed_rows(runs, reference))]
    if failures:
        parts += [f"## Failed runs\n\n{len(failures)} run(s) failed and are not in the tables above; "
                  "`vitq compare --resume` runs them again.\n",
                  markdown_table(FAILED_COLUMNS, [[f.method, f.setting, f.seed, f.error] for f in failures])]
    if plot_name:
        parts.append(f"![top-1 vs bit setting]({plot_name})\n")
    return "\n".join(parts)


def plot_series(runs: Sequence[CompareRun], settings: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Per quantized method: top-1 (means, stds) over seeds for each of ``settings`` (``nan`` if missing)."""
    groups = _groups(runs)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for method in dict.fromkeys(r.method for r in runs if r.setting != FLOAT):
        stats = [mean_std([r.top1 for r in groups[(method, s)]]) if (method, s) in groups else (math.nan, 0.0)
                 for s in settings]
        series[method] = ([m for m, _ in stats], [s for _, s in stats])
    return series


def write_compare_report(out_dir: str | Path, title: str, meta: Sequence[tuple[str, str]],
                         runs: Sequence[CompareRun], settings: Sequence[str],
                         reference: str | None = None, failures: Sequence[FailedRun] = ()) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.csv`` and ``compare.png`` into ``out_dir``; return their paths.

    With a ``reference`` label (a method label of ``runs``), the summary, per-seed table and CSV also get
    the paired top-1 difference to it. ``failures`` (runs that raised) are listed in ``compare.md`` only.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    float_top1 = [r.top1 for r in runs if r.setting == FLOAT]
    png = plot_compare(out_dir / "compare.png", settings, plot_series(runs, settings),
                       mean_std(float_top1)[0] if float_top1 else None, title=title)
    csv_path = write_csv(out_dir / "compare.csv", *csv_rows(runs, reference))
    md = write_text(out_dir / "compare.md", compare_markdown(title, meta, runs, plot_name=png.name,
                                                             reference=reference, failures=failures))
    return {"markdown": md, "csv": csv_path, "plot": png}
