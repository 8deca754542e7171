"""Matplotlib plots of results, rendered with the Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitq.files import atomic_file


def plot_compare(path: str | Path, settings: Sequence[str],
                 series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 float_level: float | None = None, *, title: str = "", ylabel: str = "top-1 (%)") -> Path:
    """Accuracy vs bit setting: one line per method with std error bars, float as a dashed line.

    ``settings`` are the x labels (e.g. ``["W8A8", "W4A4"]``); ``series`` maps a method label (the legend
    entry, shown verbatim, e.g. ``dopq-vit[softmax=log2]``) to ``(means, stds)``, one value per setting
    (``nan`` where it was not run).
    """
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = list(range(len(settings)))
    for name, (means, stds) in series.items():
        ax.errorbar(x, list(means), yerr=list(stds), marker="o", capsize=4, label=name)
    if float_level is not None:
        ax.axhline(float_level, linestyle="--", color="gray", label=f"float ({float_level:.2f})")
    ax.set_xticks(x, list(settings))
    ax.set_xlabel("bit setting")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as partial:
        fig.savefig(partial, format="png")
    return path
