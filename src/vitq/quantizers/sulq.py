"""I&S-ViT's shift-uniform-log2 quantizer (SULQ) for post-Softmax values (docs/methods/is-vit.md), per tensor,
for x ≥ 0.

The attention map is shifted by η before its log, the log is quantized *uniformly* between its calibrated
minimum and maximum, and the dequantized exponent is rounded to an integer, so every level is ``2^k − η``::

    y  = log2(x + η)                                      η > 0 keeps log2 finite at x = 0
    c  = clamp(round((y − y_min) / Δ), 0, 2^b − 1)          Δ = (y_max − y_min) / (2^b − 1)
    x̂  = 2^round(y_min + c·Δ) − η

The shift is I&S-ViT's answer to log2's coarse steps near 1 and its wasted codes near 0: with η the levels
``2^k − η`` start at exactly 0 (for ``η = 2^k``) and the uniform code grid spends codes only on exponents that
occur. The released code's calibration (:meth:`calibrate`): for each η in :data:`SHIFTS`, ``y_min``/``y_max``
are the min/max of ``log2(x + η)``, and the η with the smallest ‖x − Q(x)‖² wins. (Its inference path divides
by 2^b instead of 2^b − 1 and allows the code 2^b; this module uses the calibration's form in both, so the
codes are exactly b bits.)

Buffers: ``shift`` (η), ``log_min`` (y_min), ``log_step`` (Δ). :meth:`search_candidates` returns one candidate
per η, for a search by a downstream error (e.g. the attention output).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer, first_minimum
from vitq.quantizers.registry import register_quantizer

#: I&S-ViT's shift candidates η
SHIFTS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
#: smallest log step (a constant input has y_max = y_min)
MIN_LOG_STEP = 1e-8


@register_quantizer("sulq")
class ShiftUniformLog2Quantizer(Quantizer):
    param_names = ("shift", "log_min", "log_step")

    def __init__(self, bits: int, shifts: Sequence[float] = SHIFTS) -> None:
        try:
            shifts = tuple(float(eta) for eta in shifts)
        except (TypeError, ValueError):
            raise VitqError(f"sulq: shifts must be numbers, got {shifts!r}") from None
        if not shifts or min(shifts) <= 0:
            raise VitqError(f"sulq: shifts must be a non-empty list of numbers > 0, got {shifts!r}")
        super().__init__(bits, shifts=list(shifts))
        self.shifts = shifts
        self.q_max = 2**bits - 1

    def _candidate(self, x: torch.Tensor, eta: float) -> dict[str, torch.Tensor]:
        y = torch.log2(x.detach().float().clamp_min(0) + eta)
        low, high = y.min(), y.max()
        return {"shift": torch.tensor([eta], device=y.device), "log_min": low.reshape(1),
                "log_step": ((high - low) / self.q_max).clamp_min(MIN_LOG_STEP).reshape(1)}

    def search_candidates(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [self._candidate(x, eta) for eta in self.shifts]

    def calibrate(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        candidates = self.search_candidates(x)
        errors = []  # kept on the device: one transfer for the whole search
        for params in candidates:
            self.set_params(params)
            errors.append((self.quantize_dequantize(x) - x).double().square().sum())
        self.set_params(candidates[first_minimum(errors)])  # ties keep the smaller shift

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.log2(x.clamp_min(0) + self.shift)
        return torch.clamp(torch.round((y - self.log_min) / self.log_step), 0, self.q_max).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.pow(2.0, torch.round(self.log_min + codes.float() * self.log_step)) - self.shift

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.int_repr(x))
