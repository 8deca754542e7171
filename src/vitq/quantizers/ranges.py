"""Range initialisers: pick the clipping range [lo, hi] of each row of a 2-D tensor.

Rows are the quantization groups (one row for per-tensor, one per channel or head otherwise).
All functions are vectorised over rows.

- :func:`minmax_range`: the observed min and max.
- :func:`percentile_range`: the ``1-p`` and ``p`` quantiles (clips rare outliers).
- :func:`mse_range_search`: RepQ-ViT's search (docs/protocol.md#what-is-quantized): for each candidate percentile p,
  fake-quantize the row with the percentile range and keep, per row, the p whose squared error
  ``||x - Q(x)||^2`` is smallest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: RepQ-ViT's candidate percentiles for the MSE search.
REPQ_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
#: the wider per-row weight search of the ERQ code (docs/protocol.md#what-is-quantized; I&S-ViT uses it without 1.0)
WEIGHT_PERCENTILES: tuple[float, ...] = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999, 1.0)

RangeQuantizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def minmax_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.amin(dim=1), rows.amax(dim=1)


class TailQuantiles:
    """Quantiles near both ends of each row, interpolated like ``torch.quantile`` (linear).

    Only the ``k`` smallest and ``k`` largest values of each row are kept (``topk``), enough for every
    percentile >= ``min_percentile``: much cheaper than sorting millions of activations, and free of
    ``torch.quantile``'s 2^24-element limit.
    """

    def __init__(self, rows: torch.Tensor, min_percentile: float) -> None:
        self.n = rows.shape[1]
        k = min(self.n, int((1.0 - min_percentile) * (self.n - 1)) + 2)
        self.min_percentile = min_percentile
        self.largest = rows.topk(k, dim=1, largest=True, sorted=True).values  # descending
        self.smallest = rows.topk(k, dim=1, largest=False, sorted=True).values  # ascending

    @staticmethod
    def _at(tail: torch.Tensor, pos: float) -> torch.Tensor:
        """Value at fractional position ``pos`` from the tail's extreme, linearly interpolated."""
        below = int(pos)
        above = min(below + 1, tail.shape[1] - 1)
        return tail[:, below] + (pos - below) * (tail[:, above] - tail[:, below])

    def range(self, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``1-p`` and ``p`` quantiles of each row."""
        if not self.min_percentile <= p <= 1.0:
            raise ValueError(f"percentile {p} is outside [{self.min_percentile}, 1]")
        # quantile q sits at sorted position q·(n-1); from the top, position p·(n-1) is (1-p)·(n-1) away
        distance = (1.0 - p) * (self.n - 1)
        return self._at(self.smallest, distance), self._at(self.largest, distance)


def percentile_range(rows: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.5 < p <= 1.0:
        raise ValueError(f"percentile must be in (0.5, 1], got {p}")
    return TailQuantiles(rows, p).range(p)


def mse_range_search(
    rows: torch.Tensor,
    quantize_rows: RangeQuantizer,
    candidates: Sequence[float] = REPQ_PERCENTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the percentile range whose fake-quant has the lowest squared error.

    ``quantize_rows(rows, lo, hi)`` must return the fake-quant of ``rows`` under per-row ranges.
    """
    tails = TailQuantiles(rows, min(candidates))
    best_err = torch.full((rows.shape[0],), float("inf"), dtype=rows.dtype, device=rows.device)
    best_lo = torch.zeros_like(best_err)
    best_hi = torch.zeros_like(best_err)
    for p in candidates:
        lo, hi = tails.range(p)
        err = quantize_rows(rows, lo, hi).sub_(rows).square_().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi
