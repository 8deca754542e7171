"""Range initialisers: pick the clipping range [lo, hi] of each row of a 2-D tensor.

Rows are the quantization groups (one row for per-tensor, one per channel or head otherwise).
All functions are vectorised over rows.

- :func:`minmax_range`: the observed min and max.
- :func:`percentile_range`: the ``1-p`` and ``p`` quantiles (clips rare outliers).
- :func:`mse_range_search`: RepQ-ViT's search (NOTES §2.0): for each candidate percentile p,
  fake-quantize the row with the percentile range and keep, per row, the p whose squared error
  ``||x - Q(x)||^2`` is smallest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: RepQ-ViT's candidate percentiles for the MSE search.
REPQ_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)

RangeQuantizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def minmax_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.amin(dim=1), rows.amax(dim=1)


def _sorted_quantile(sorted_rows: torch.Tensor, p: float) -> torch.Tensor:
    """Quantile ``p`` of each (already sorted) row, linear interpolation as ``torch.quantile``.

    ``torch.quantile`` refuses inputs above 2^24 elements; one sort serves every candidate.
    """
    n = sorted_rows.shape[1]
    pos = p * (n - 1)
    below = int(pos)
    above = min(below + 1, n - 1)
    frac = pos - below
    return sorted_rows[:, below] + frac * (sorted_rows[:, above] - sorted_rows[:, below])


def percentile_range(rows: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.5 < p <= 1.0:
        raise ValueError(f"percentile must be in (0.5, 1], got {p}")
    sorted_rows = rows.sort(dim=1).values
    return _sorted_quantile(sorted_rows, 1.0 - p), _sorted_quantile(sorted_rows, p)


def mse_range_search(
    rows: torch.Tensor,
    quantize_rows: RangeQuantizer,
    candidates: Sequence[float] = REPQ_PERCENTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the percentile range whose fake-quant has the lowest squared error.

    ``quantize_rows(rows, lo, hi)`` must return the fake-quant of ``rows`` under per-row ranges.
    """
    sorted_rows = rows.sort(dim=1).values
    best_err = torch.full((rows.shape[0],), float("inf"), dtype=rows.dtype, device=rows.device)
    best_lo = torch.zeros_like(best_err)
    best_hi = torch.zeros_like(best_err)
    for p in candidates:
        lo, hi = _sorted_quantile(sorted_rows, 1.0 - p), _sorted_quantile(sorted_rows, p)
        err = (quantize_rows(rows, lo, hi) - rows).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi
