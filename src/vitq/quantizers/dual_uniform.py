"""Dual uniform weight quantizer: two (Δ, z) per output row, one for the outlier input columns
(docs/methods/erq.md#dual-uniform-weights-journal-version).

The journal version of ERQ (TPAMI 2025, "two_part") quantizes the weights of ``qkv`` and ``fc1`` this way:
a few input columns hold most of the large weights of every row (they meet the post-LayerNorm outlier
channels), so a single per-row range is set by them and wastes resolution on the rest. For each row the
entries above the 99th percentile of its positive values or below the 1st percentile of its negative
values are outliers; the ``floor(outlier_ratio · rows)`` input columns that are outliers in the most rows
(ties: lower index) form the outlier set. Each row then has ``(Δ₁, z₁)`` for those columns and ``(Δ₂, z₂)``
for the others, both found by the same range initialiser as a per-channel uniform quantizer. In
hardware this is two GEMMs (or one split over the input dimension) per layer.

Weights of any rank are seen as ``rows × (flattened rest)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer
from vitq.quantizers.ranges import REPQ_PERCENTILES
from vitq.quantizers.registry import register_quantizer
from vitq.quantizers.uniform import UniformQuantizer, code_range, fake_quant

#: per-row percentiles of the positive / negative values beyond which an entry is an outlier
OUTLIER_PERCENTILES = (0.99, 0.01)


def outlier_columns(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` columns of ``weight`` (rows × columns) that are outliers in the most rows."""
    w = weight.detach().double()
    positive = torch.where(w > 0, w, torch.nan)
    negative = torch.where(w < 0, w, torch.nan)
    high = torch.nanquantile(positive, OUTLIER_PERCENTILES[0], dim=1, keepdim=True)
    low = torch.nanquantile(negative, OUTLIER_PERCENTILES[1], dim=1, keepdim=True)
    # a row without positive (negative) values has a NaN threshold: no comparison is true
    counts = ((w > high) | (w < low)).sum(dim=0)
    mask = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
    mask[torch.argsort(counts, descending=True, stable=True)[:count]] = True
    return mask


@register_quantizer("dual_uniform")
class DualUniformQuantizer(Quantizer):
    param_names = ("scale", "zero_point", "outlier_mask")

    def __init__(self, bits: int, init: str = "mse", percentile: float = 0.9999,
                 search_percentiles: Sequence[float] = REPQ_PERCENTILES, outlier_ratio: float = 0.05) -> None:
        if isinstance(outlier_ratio, bool) or not isinstance(outlier_ratio, int | float) or not 0 <= outlier_ratio < 1:
            raise VitqError(f"outlier_ratio must be a number in [0, 1), got {outlier_ratio!r}")
        self._row_spec = {"kind": "uniform", "bits": bits, "granularity": "channel", "axis": 0, "init": init,
                          "percentile": percentile, "search_percentiles": list(search_percentiles)}
        UniformQuantizer(**{k: v for k, v in self._row_spec.items() if k != "kind"})  # validates the options
        super().__init__(bits, init=init, percentile=percentile, search_percentiles=list(search_percentiles),
                         outlier_ratio=outlier_ratio)
        self.outlier_ratio = outlier_ratio
        self.q_min, self.q_max = code_range(bits, signed=False)

    def calibrate(self, x: torch.Tensor) -> None:
        rows = x.detach().float().reshape(x.shape[0], -1)
        mask = outlier_columns(rows, int(self.outlier_ratio * rows.shape[0]))
        params = []
        for part in (mask, ~mask):
            row_quantizer = UniformQuantizer(**{k: v for k, v in self._row_spec.items() if k != "kind"})
            row_quantizer.calibrate(rows[:, part] if bool(part.any()) else rows)  # an empty part is never used
            params.append((row_quantizer.scale, row_quantizer.zero_point))
        self.scale = torch.stack([params[0][0], params[1][0]], dim=1)
        self.zero_point = torch.stack([params[0][1], params[1][1]], dim=1)
        self.outlier_mask = mask.float()

    def entry_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point of every weight entry, as ``rows × columns`` matrices."""
        mask = self.outlier_mask.bool()[None, :]
        return (torch.where(mask, self.scale[:, :1], self.scale[:, 1:]),
                torch.where(mask, self.zero_point[:, :1], self.zero_point[:, 1:]))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1)
        if rows.shape != (self.scale.shape[0], self.outlier_mask.numel()):
            raise VitqError(f"dual uniform quantizer calibrated for {self.scale.shape[0]} x {self.outlier_mask.numel()}"
                            f" weights, got {tuple(rows.shape)}")
        return rows

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.entry_params()
        codes = torch.round(self._rows(x) / scale) + zero_point
        return codes.clamp(self.q_min, self.q_max).to(torch.int32).reshape(x.shape)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.entry_params()
        return ((self._rows(codes).float() - zero_point) * scale).reshape(codes.shape)

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.entry_params()
        return fake_quant(self._rows(x), scale, zero_point, self.q_min, self.q_max).reshape(x.shape)
