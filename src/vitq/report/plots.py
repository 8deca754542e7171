"""Matplotlib plots of results, rendered with the Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vitq.files import atomic_file


def _write_png(fig: Figure, path: str | Path) -> Path:
    """Lay out ``fig`` and write it to ``path`` as PNG, whole or not at all."""
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as partial:
        fig.savefig(partial, format="png")
    return path


def _write_line_plot(fig: Figure, ax, path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Axis labels, title, grid and legend of a line plot, then :func:`_write_png`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _write_png(fig, path)


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
    return _write_line_plot(fig, ax, path, "bit setting", ylabel, title)


def plot_pareto(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                *, float_level: float | None = None, title: str = "", xlabel: str = "model size (MB)",
                ylabel: str = "top-1 (%)") -> Path:
    """Accuracy against cost: one line per series, ``(xs, means, stds)`` with std error bars (e.g. uniform and
    mixed-precision models of one method at several sizes), float as a dashed line."""
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (xs, means, stds) in series.items():
        ax.errorbar(list(xs), list(means), yerr=list(stds), marker="o", capsize=4, label=name)
    if float_level is not None:
        ax.axhline(float_level, linestyle=":", color="gray", label=f"float ({float_level:.2f})")
    return _write_line_plot(fig, ax, path, xlabel, ylabel, title)


def plot_sensitivity(path: str | Path, labels: Sequence[str], values: Sequence[float], is_weight: Sequence[bool], *,
                     title: str = "", xlabel: str = "KL to the float prediction (nats/image)") -> Path:
    """Horizontal bars, the first label on top, log-scaled; weights and activations in two colours."""
    fig = Figure(figsize=(7.0, 1.2 + 0.16 * len(labels)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = list(range(len(labels)))[::-1]
    colours = ["tab:blue" if weight else "tab:orange" for weight in is_weight]
    floor = min([v for v in values if v > 0], default=1e-12) / 10  # a zero cannot sit on a log axis
    ax.barh(y, [max(v, floor) for v in values], color=colours)
    ax.set_yticks(y, list(labels), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.legend(handles=[Patch(color="tab:blue", label="weight"), Patch(color="tab:orange", label="activation")],
              fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    return _write_png(fig, path)
