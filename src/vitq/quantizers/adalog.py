"""AdaLog's adaptive-base logarithmic quantizer (Wu et al., ECCV 2024; docs/methods/adalog.md), per tensor,
for x ≥ −shift.

The base is ``2^(q/r)`` with ``r = 37`` fixed and an integer ``q`` searched (``q/r`` from 0.27 to 3.7 octaves per
step: a base tuned to each layer instead of log2's fixed 2 or log√2's √2)::

    y   = x + shift                                         (shift > 0 makes post-GELU values positive)
    k   = round(−log2(y / s) · r / q)                        codes 0..2^b−1;  k ≥ 2^b or y ≤ 0  →  zero code 2^b
    ŷ   = s · 2^(−⌊k·q/r⌋) · T[(k·q) mod r]                  T[j] = round(2^(−j/r)·(2^(b+1)−2)) / (2^(b+1)−2)
    x̂   = ŷ − shift

so dequantization is a shift plus a (b+1)-bit table entry (the hardware form AdaLog evaluates with; exact
``2^(−k·q/r)`` differs from it by less than one table step). Post-Softmax: ``s = 1`` fixed (probabilities never
exceed 1), ``shift = 0``. Post-GELU: ``shift = 0.16997`` (≈ −min GELU) and ``s`` searched; AdaLog folds the
``−shift`` into fc2's bias after calibration, which is the same as subtracting it here.

Buffers: ``scale`` (s) and ``base`` (q, stored as a float tensor). :meth:`search_candidates` returns the
(s, q) grid — ``bases`` x (``fixed_scale``, or the ``search_percentiles`` quantiles of y) — for a search by a
downstream error (AdaLog: the layer's output MSE); :meth:`calibrate` picks by ‖x − Q(x)‖².
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer, first_minimum
from vitq.quantizers.ranges import REPQ_PERCENTILES, TailQuantiles
from vitq.quantizers.registry import register_quantizer

#: AdaLog's fixed denominator of the base exponent: base = 2^(q/R)
R = 37
#: AdaLog's base search range: q in [10, 10 + 128]
DEFAULT_BASES = tuple(range(10, 139))
GELU_SHIFT = 0.16997
MIN_SCALE = 1e-8


def adalog_table(bits: int) -> torch.Tensor:
    """``T[j] = round(2^(−j/r)·(2^(b+1)−2)) / (2^(b+1)−2)`` for j = 0..r−1: the fractional part's LUT."""
    denominator = 2 ** (bits + 1) - 2
    return torch.round(torch.pow(2.0, -torch.arange(R, dtype=torch.float64) / R) * denominator) / denominator


@register_quantizer("adalog")
class AdaLogQuantizer(Quantizer):
    param_names = ("scale", "base")

    def __init__(self, bits: int, shift: float = 0.0, fixed_scale: float | None = None,
                 bases: Sequence[int] = DEFAULT_BASES, search_percentiles: Sequence[float] = REPQ_PERCENTILES) -> None:
        try:
            bases = tuple(int(q) for q in bases)
            search_percentiles = tuple(float(p) for p in search_percentiles)
            shift = float(shift)
        except (TypeError, ValueError):
            raise VitqError("adalog: bases must be integers, search_percentiles and shift numbers") from None
        if not bases or min(bases) < 1:
            raise VitqError(f"adalog: bases must be a non-empty list of integers >= 1, got {bases!r}")
        if fixed_scale is not None and not (math.isfinite(fixed_scale) and fixed_scale > 0):
            raise VitqError(f"adalog: fixed_scale must be > 0, got {fixed_scale!r}")
        if fixed_scale is None and not search_percentiles:
            raise VitqError("adalog: needs a fixed_scale or at least one search percentile")
        if not (math.isfinite(shift) and shift >= 0):
            raise VitqError(f"adalog: shift must be >= 0, got {shift!r}")
        super().__init__(bits, shift=shift, fixed_scale=fixed_scale, bases=list(bases),
                         search_percentiles=list(search_percentiles))
        self.shift, self.fixed_scale, self.bases = shift, fixed_scale, bases
        self.search_percentiles = search_percentiles
        self.register_buffer("table", adalog_table(bits).float(), persistent=False)

    @property
    def zero_code(self) -> int:
        return 2**self.bits

    # ------------------------------------------------------------------ formulas
    def _codes(self, x: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        ratio = (x + self.shift) / scale
        positive = ratio > 0
        exponent = ratio.masked_fill(~positive, 1.0).log2().mul_(-R / base).round_()
        zero = (exponent >= self.zero_code).logical_or_(~positive)
        return exponent.clamp_(0, self.zero_code - 1).masked_fill_(zero, self.zero_code).to(torch.int32)

    def _levels(self, codes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        # the base stays a tensor (int(base) would wait for the device at every call)
        steps = codes.clamp(0, self.zero_code - 1).to(torch.int64) * base.to(torch.int64)
        fraction = self.table.to(device=scale.device, dtype=scale.dtype)[steps % R]  # no-op once on the device
        out = torch.ldexp(fraction, -(steps // R)) * scale
        return out.masked_fill_(codes >= self.zero_code, 0.0) - self.shift

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale.reshape(()), self.base.reshape(())

    # ------------------------------------------------------------------ calibration
    def _scale_candidates(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fixed_scale is not None:
            return [torch.tensor(self.fixed_scale, device=x.device)]
        tails = TailQuantiles((x.detach().float() + self.shift).reshape(1, -1), min(self.search_percentiles))
        return [tails.range(p)[1].reshape(()).clamp_min(MIN_SCALE) for p in self.search_percentiles]

    def search_candidates(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Every (scale, base) pair: scales outer, bases inner."""
        return [{"scale": scale.reshape(1), "base": torch.tensor([float(q)], device=scale.device)}
                for scale in self._scale_candidates(x) for q in self.bases]

    def calibrate(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        candidates = self.search_candidates(x)
        errors = []  # kept on the device: one transfer for the whole search, not one per candidate
        for params in candidates:
            scale, base = params["scale"].reshape(()), params["base"].reshape(())
            errors.append((self._levels(self._codes(x, scale, base), scale, base) - x).square().sum())
        self.set_params(candidates[first_minimum(errors)])

    # ------------------------------------------------------------------ quantization
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        return self._codes(x, *self._params())

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self._levels(codes, *self._params())

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, base = self._params()
        return self._levels(self._codes(x, scale, base), scale, base).to(x.dtype)
