"""The leaderboard: every method x bit setting on one model, next to the papers' numbers.

Our evaluation images are easier than ImageNet-val (DeiT-tiny float 79.6 % here vs 72.21 % in the papers), so
the comparable quantity is the *drop from float*: ours is paired (same images), the papers' is their
top-1 minus their float. :data:`PAPER_TOP1` holds the papers' ImageNet-val top-1 (docs/protocol.md#published-numbers,
with sources); a method without a paper number at a setting gets an empty cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vitq.files import write_text
from vitq.report.compare import FLOAT, CompareRun, plot_series
from vitq.report.plots import plot_compare
from vitq.report.stats import format_mean_std, mean_std
from vitq.report.tables import markdown_table

#: the papers' float top-1 on ImageNet-val
PAPER_FLOAT = {"deit_tiny_patch16_224": 72.21}

#: (model, method, setting) -> (top-1 on ImageNet-val, where it comes from); "recon." = with block reconstruction
PAPER_TOP1: dict[tuple[str, str, str], tuple[float, str]] = {
    ("deit_tiny_patch16_224", "repq-vit", "W6A6"): (70.76, "RepQ-ViT README"),
    ("deit_tiny_patch16_224", "repq-vit", "W4A4"): (57.43, "APHQ-ViT T1"),
    ("deit_tiny_patch16_224", "repq-vit", "W3A4"): (29.34, "ERQ (re-run)"),
    ("deit_tiny_patch16_224", "repq-vit", "W3A3"): (0.10, "APHQ-ViT T1"),
    ("deit_tiny_patch16_224", "gptq", "W4A4"): (58.96, "ERQ (GPTQ*)"),
    ("deit_tiny_patch16_224", "gptq", "W3A4"): (42.25, "ERQ (GPTQ*)"),
    ("deit_tiny_patch16_224", "erq", "W4A4"): (60.29, "ERQ ICML'24"),
    ("deit_tiny_patch16_224", "erq", "W3A4"): (52.73, "ERQ TPAMI'25"),
    ("deit_tiny_patch16_224", "ptq4vit", "W6A6"): (69.68, "PTQ4ViT, recalled: not found in its tables"),
    ("deit_tiny_patch16_224", "ptq4vit", "W4A4"): (36.96, "APHQ-ViT T1"),
    ("deit_tiny_patch16_224", "ptq4vit", "W3A3"): (3.50, "APHQ-ViT T1"),
    ("deit_tiny_patch16_224", "dopq-vit", "W4A4"): (65.54, "DopQ-ViT, recon."),
    ("deit_tiny_patch16_224", "dopq-vit", "W3A3"): (44.71, "DopQ-ViT, recon."),
    ("deit_tiny_patch16_224", "adalog", "W6A6"): (71.38, "AdaLog README"),
    ("deit_tiny_patch16_224", "adalog", "W4A4"): (63.52, "AdaLog README"),
    ("deit_tiny_patch16_224", "adalog", "W3A3"): (31.56, "AdaLog README"),
    ("deit_tiny_patch16_224", "fqvit", "W4A4"): (0.10, "ERQ table"),
    ("deit_tiny_patch16_224", "fqvit", "W3A4"): (0.10, "ERQ (re-run)"),
}

COLUMNS = ["method", "bits", "seeds", "top-1 % (mean ± std)", "drop from float (mean ± std)", "paper drop (source)",
           "calibration s (mean)"]


def paper_drop(model: str, method: str, setting: str) -> str:
    """``"14.78 (APHQ-ViT T1)"``: the paper's drop from its float, or ``""``."""
    entry, float_top1 = PAPER_TOP1.get((model, method, setting)), PAPER_FLOAT.get(model)
    if entry is None or float_top1 is None:
        return ""
    return f"{float_top1 - entry[0]:.2f} ({entry[1]})"


def leaderboard_rows(runs: Sequence[CompareRun], model: str) -> list[list]:
    """One row per method x setting (float first), in the order the runs came."""
    groups: dict[tuple[str, str], list[CompareRun]] = {}
    for run in runs:
        groups.setdefault((run.method, run.setting), []).append(run)
    rows = []
    for (method, setting), group in sorted(groups.items(), key=lambda item: item[0][1] != FLOAT):
        rows.append([method, setting, len(group), format_mean_std([r.top1 for r in group]),
                     format_mean_std([r.drop for r in group]), paper_drop(model, method, setting),
                     f"{mean_std([r.calib_seconds for r in group])[0]:.1f}"])
    return rows


def write_leaderboard(path: str | Path, model: str, meta: Sequence[tuple[str, str]], runs: Sequence[CompareRun],
                      settings: Sequence[str]) -> Path:
    """Write the leaderboard markdown at ``path`` and its plot next to it (``<stem>.png``)."""
    path = Path(path)
    float_top1 = [r.top1 for r in runs if r.setting == FLOAT]
    png = plot_compare(path.with_suffix(".png"), settings, plot_series(runs, settings),
                       mean_std(float_top1)[0] if float_top1 else None, title=f"vitq leaderboard: {model}")
    lines = [f"# vitq leaderboard: {model}", "", *(f"- {key}: {value}" for key, value in meta), "",
             "Drops from float are paired (the same evaluation images per seed); the papers' drops are on "
             f"ImageNet-val (float {PAPER_FLOAT.get(model, 'n/a')}), whose images are harder than ours, so compare "
             "drops, not top-1. \"recon.\" = the paper's number includes block reconstruction.", "",
             markdown_table(COLUMNS, leaderboard_rows(runs, model)), "", f"![top-1 vs bit setting]({png.name})", ""]
    return write_text(path, "\n".join(lines))
