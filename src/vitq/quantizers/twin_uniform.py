"""PTQ4ViT's twin uniform quantizers (Yuan et al., ECCV 2022; docs/methods/ptq4vit.md): two uniform ranges of 2^(b−1)
codes each, one fine and one coarse, whose steps differ by a power of two so that hardware aligns them with a shift.

Two kinds, because the two activations they serve share only the idea: the post-Softmax one has a fixed coarse
step and a searched *split point*, codes unsigned; the post-GELU one has a fixed fine step and a searched *coarse
step*, codes signed. One class per kind keeps each spec self-describing (no mode flag whose meaning changes the
parameters). With ``H = 2^(b−1)`` codes per range and ``k = H − 1`` the top code of a range:

``twin_uniform_softmax`` (x ∈ [0, 1], split point ``s = 2^−i``, i = 0..19 searched)::

    Δ_lo = s/k,  Δ_hi = 1/k                                (Δ_hi = 2^i·Δ_lo)
    x ≤ s:  c = clamp(round(x/Δ_lo), 0, k),      x̂ = c·Δ_lo        codes 0..H−1   (fine range [0, s])
    x > s:  c = H + clamp(round(x/Δ_hi), 0, k),  x̂ = (c − H)·Δ_hi  codes H..2H−1 (coarse range [0, 1])

The most significant bit of the b-bit unsigned code selects the range (PTQ4ViT stores them as uint8). The released
code computes ``round(clamp(x, s, 1)/Δ_hi)·Δ_hi + round(clamp(x, 0, s)/Δ_lo)·Δ_lo``, which is the same steps but
adds the saturated fine half ``s`` to every value above the split (and ``round(s/Δ_hi)·Δ_hi`` to every value
below it when ``s ≥ Δ_hi/2``); that sum is not idempotent. This is the paper's piecewise form, R1 = [0, s]
fine and the rest coarse: idempotent, since every coarse level ``m/k ≤ s`` is also a fine level (``s`` is a
power of two).

``twin_uniform_gelu`` (GELU output ≥ −0.16997)::

    Δ− = 0.16997/2^(b−1)  (fixed: the negative range covers GELU's minimum),  Δ+ searched
    x < 0:  c = clamp(round(x/Δ−), −H, 0),   x̂ = c·Δ−          codes −H..0
    x ≥ 0:  c = clamp(round(x/Δ+), 0, k),    x̂ = c·Δ+          codes 0..H−1

as one signed b-bit code whose sign bit selects the range. Δ+ candidates (``grid``):
``"pow2"`` (default, the paper's constraint Δ+ = 2^m·Δ−, m ≥ 0, which AdaLog's re-implementation also uses):
m = 0 .. ⌈log2(1.2·max(x)/(H − ½)/Δ−)⌉; ``"linear"`` (PTQ4ViT's released code, no power-of-two relation):
Δ+ ∈ linspace(0.01, 1.2, ``eq_n``)·max(x)/(H − ½).

Both kinds' :meth:`calibrate` picks their candidate with the smallest ‖x − Q(x)‖²; PTQ4ViT itself picks by the
Hessian-guided output error (:mod:`vitq.methods.ptq4vit.hessian`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer, first_minimum
from vitq.quantizers.registry import register_quantizer

#: −min GELU(x) (PTQ4ViT's constant): the negative range of the post-GELU quantizer covers [−GELU_MIN, 0]
GELU_MIN = 0.16997124254703522
#: PTQ4ViT's search interval for uniform steps, in units of max|x|/(2^(b−1) − ½)
EQ_ALPHA, EQ_BETA = 0.01, 1.2
DEFAULT_EQ_N = 100
GRIDS = ("pow2", "linear")
#: PTQ4ViT's split points 2^−i, i = 0..19
DEFAULT_SPLIT_EXPONENTS = tuple(range(20))
MIN_STEP = 1e-8


def step_factors(eq_n: int) -> torch.Tensor:
    """PTQ4ViT's search interval ``linspace(0.01, 1.2, eq_n)`` (float64), in units of ``max|x|/(2^(b−1) − ½)``."""
    return torch.linspace(EQ_ALPHA, EQ_BETA, eq_n, dtype=torch.float64)


def step_grid(x_max: float, bits: int, eq_n: int) -> torch.Tensor:
    """PTQ4ViT's candidate steps ``linspace(0.01, 1.2, eq_n)·x_max/(2^(b−1) − ½)`` (float64)."""
    return step_factors(eq_n) * (max(x_max, MIN_STEP) / (2 ** (bits - 1) - 0.5))


class _TwinQuantizer(Quantizer):
    """Shared life cycle: one searched parameter, candidates from :meth:`search_candidates`, MSE calibration."""

    @property
    def half(self) -> int:
        """H = 2^(b−1): the number of codes of each range."""
        return 2 ** (self.bits - 1)

    def calibrate(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        candidates = self.search_candidates(x)
        errors = []  # kept on the device: one transfer for the whole search
        for params in candidates:
            self.set_params(params)
            errors.append((self.quantize_dequantize(x) - x).double().square().sum())
        self.set_params(candidates[first_minimum(errors)])


@register_quantizer("twin_uniform_softmax")
class TwinUniformSoftmaxQuantizer(_TwinQuantizer):
    """Post-Softmax twin uniform quantizer; buffer ``split`` (s, a power of two)."""

    param_names = ("split",)

    def __init__(self, bits: int, split_exponents: Sequence[int] = DEFAULT_SPLIT_EXPONENTS) -> None:
        try:
            exponents = tuple(int(i) for i in split_exponents)
        except (TypeError, ValueError):
            raise VitqError(f"twin_uniform_softmax: split_exponents must be integers, got {split_exponents!r}") \
                from None
        if not exponents or min(exponents) < 0:
            raise VitqError(f"twin_uniform_softmax: split_exponents must be a non-empty list of integers >= 0, "
                            f"got {list(exponents)!r}")
        super().__init__(bits, split_exponents=list(exponents))
        self.split_exponents = exponents

    def search_candidates(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [{"split": torch.tensor([2.0**-i], device=x.device)} for i in self.split_exponents]

    def _codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fine codes, coarse codes without their offset H, mask of the fine range x ≤ s), as floats."""
        s, k = self.split.reshape(()).to(x.dtype), self.half - 1
        return (x * k / s).round_().clamp_(0, k), (x * k).round_().clamp_(0, k), x <= s

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        fine, coarse, in_fine = self._codes(x)
        return torch.where(in_fine, fine, coarse.add_(self.half)).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        s, k = self.split.reshape(()).float(), self.half - 1
        codes = codes.float()
        return torch.where(codes < self.half, codes * s / k, (codes - self.half) / k)

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        fine, coarse, in_fine = self._codes(x)
        return torch.where(in_fine, fine.mul_(self.split.reshape(()).to(x.dtype)).div_(self.half - 1),
                           coarse.div_(self.half - 1))


@register_quantizer("twin_uniform_gelu")
class TwinUniformGeluQuantizer(_TwinQuantizer):
    """Post-GELU twin uniform quantizer; buffer ``pos_step`` (Δ+), Δ− fixed."""

    param_names = ("pos_step",)

    def __init__(self, bits: int, grid: str = "pow2", eq_n: int = DEFAULT_EQ_N) -> None:
        if grid not in GRIDS:
            raise VitqError(f"twin_uniform_gelu: grid must be one of {GRIDS}, got {grid!r}")
        if isinstance(eq_n, bool) or not isinstance(eq_n, int) or eq_n < 1:
            raise VitqError(f"twin_uniform_gelu: eq_n must be an integer >= 1, got {eq_n!r}")
        super().__init__(bits, grid=grid, eq_n=eq_n)
        self.grid, self.eq_n = grid, eq_n

    @property
    def neg_step(self) -> float:
        """Δ− = 0.16997/2^(b−1)."""
        return GELU_MIN / self.half

    def search_candidates(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        linear = step_grid(float(x.detach().max()), self.bits, self.eq_n)
        if self.grid == "linear":
            steps = linear.tolist()
        else:
            top = max(0, math.ceil(math.log2(float(linear[-1]) / self.neg_step)))
            steps = [self.neg_step * 2**m for m in range(top + 1)]
        return [{"pos_step": torch.tensor([step], dtype=torch.float32, device=x.device)} for step in steps]

    def _codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(negative-range codes, positive-range codes, mask x < 0), as floats."""
        positive = (x / self.pos_step.reshape(()).to(x.dtype)).round_().clamp_(0, self.half - 1)
        return (x / self.neg_step).round_().clamp_(-self.half, 0), positive, x < 0

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        negative, positive, in_negative = self._codes(x)
        return torch.where(in_negative, negative, positive).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.float()
        return torch.where(codes < 0, codes * self.neg_step, codes * self.pos_step.reshape(()).float())

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        negative, positive, in_negative = self._codes(x)
        return torch.where(in_negative, negative.mul_(self.neg_step),
                           positive.mul_(self.pos_step.reshape(()).to(x.dtype)))
