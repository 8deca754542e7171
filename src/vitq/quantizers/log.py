"""Logarithmic quantizers for post-Softmax probabilities x ∈ [0, 1] (per-tensor, unsigned, b bits, n = 2^b).

Two kinds, both with one buffer ``scale`` (Δ, the largest representable value):

- ``"log2"`` (:class:`Log2Quantizer`)::

      x_int = round(−log2(x/Δ));  mask = x_int ≥ n;  q = clamp(x_int, 0, n−1)
      x̂ = Δ·2^(−q);  x̂[mask] = 0

- ``"log_sqrt2"`` (:class:`LogSqrt2Quantizer`, RepQ-ViT, docs/methods/repq-vit.md#post-softmax-log-sqrt2-quantizer)::

      x_int = round(−2·log2(x/Δ));  mask = x_int ≥ n;  q = clamp(x_int, 0, n−1)
      x̂ = Δ·2^(−ceil(q/2))·(1 + (q mod 2)(√2−1));  x̂[mask] = 0      (i.e. x̂ = Δ·2^(−q/2))

**Code convention** (both kinds, exactly RepQ-ViT's): codes ``0..n−1`` are the n non-zero levels
(code 0 = Δ, larger code = smaller value), and the extra code ``n`` (= :attr:`LogQuantizer.zero_code`)
means "underflow", x̂ = 0. ``int_repr`` returns int32 codes in ``0..n``; ``dequantize`` reads any code
``≥ n`` as zero. Values above Δ saturate to code 0 (x̂ = Δ); x = 0 (and x so small that x/Δ
underflows, or negative x) gets the zero code, computed without taking log(0). Like RepQ-ViT this is
n non-zero levels *plus* zero, i.e. n + 1 symbols for "b bits": the zero is the shifted-out value of
a shift kernel, not one of the 2^b exponents. Note that log√2 with n codes spans only n/2 octaves
(everything below about Δ·2^(−(n−½)/2) becomes 0), log2 spans n octaves (docs/protocol.md#softmax-quantizers-alone: at 3
bits log√2 zeroes everything below Δ·2^−3.75 and collapses the attention rows, log2 keeps down to Δ·2^−7). For
log2 at 8 bits the smallest levels Δ·2^(−q) fall below float32's range and dequantize to 0.

**Calibration** (RepQ-ViT): Δ candidates are the quantiles of x at ``search_percentiles`` (default
{0.999, 0.9999, 0.99999}; 1.0 = max) plus the constants ``fixed_scales`` (e.g. 1.0, the softmax upper
bound); the candidate with the lowest ‖x − Q(x)‖² wins (the first one on ties). ``search_candidates``
returns the same candidates, so a method can pick by the attention-output error ‖AV − Q(A)V‖² instead.

**Shift kernels** (the log√2 → log2 reparameterisation of the RepQ-ViT paper, RepQ-ViT issues #2/#12):
:func:`log2_attention_matmul` and :func:`log_sqrt2_attention_matmul` compute Q(A)·V from the integer
codes with additions and power-of-two scalings only (``torch.ldexp``), never reading the float level
table. For log√2, even code 2m contributes V·2^(−m) and odd code 2m−1 contributes V·2^(−m)·√2: the odd
set is accumulated separately and its partial sum is multiplied by √2 once per output element (which
hardware folds into the next layer's scale), so the kernel is a log2 (shift) kernel::

      Q(A)·V = Δ·( Σ_{q even} 2^(−q/2)·V  +  √2·Σ_{q odd} 2^(−(q+1)/2)·V )
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer, first_minimum
from vitq.quantizers.ranges import REPQ_PERCENTILES, TailQuantiles
from vitq.quantizers.registry import register_quantizer

#: smallest Δ; keeps x/Δ finite for an all-zero calibration tensor
MIN_SCALE = 1e-8
SQRT2 = math.sqrt(2.0)


# ------------------------------------------------------------------ codes and levels (shared by both kinds)


def log_exponents(x: torch.Tensor, scale: torch.Tensor, bits: int,
                  steps_per_octave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of ``x`` as float32 ``clamp(round(−k·log2(x/Δ)), 0, n−1)``, and the bool mask of the entries
    that get the zero code instead (``round(−k·log2(x/Δ)) ≥ n`` or ``x/Δ ≤ 0``; k = ``steps_per_octave``)."""
    n = 2**bits
    ratio = x / scale
    positive = ratio > 0
    # log2 only of positive values: no -inf/NaN (and no warning) for x == 0 or x < 0 (in place on the
    # fresh ``ratio``: activations are large)
    exponent = ratio.masked_fill_(~positive, 1.0).log2_().mul_(-steps_per_octave).round_()
    zero = (exponent >= n).logical_or_(~positive)
    return exponent.clamp_(0, n - 1).float(), zero


def log_codes(x: torch.Tensor, scale: torch.Tensor, bits: int, steps_per_octave: int) -> torch.Tensor:
    """int32 codes ``0..n`` of ``x``: ``clamp(round(−k·log2(x/Δ)), 0, n−1)``, or ``n`` (zero) where
    ``round(−k·log2(x/Δ)) ≥ n`` or ``x/Δ ≤ 0`` (k = ``steps_per_octave``: 1 for log2, 2 for log√2)."""
    exponent, zero = log_exponents(x, scale, bits, steps_per_octave)
    return exponent.masked_fill_(zero, 2**bits).to(torch.int32)


def log2_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Δ·2^(−q) of float codes ``q`` in 0..n−1, computed in place on ``q``."""
    return q.neg_().exp2_().mul_(scale)


def log_sqrt2_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """RepQ-ViT's Δ·2^(−ceil(q/2))·(1 + (q mod 2)(√2−1)) of float codes ``q`` in 0..n−1, in place on ``q``."""
    half = (q / 2).ceil_()
    odd_factor = q.sub_(half, alpha=2).mul_(1 - SQRT2).add_(1)  # q − 2·ceil(q/2) = −(q mod 2), exact
    return half.neg_().exp2_().mul_(odd_factor).mul_(scale)


# ------------------------------------------------------------------ integer (shift) kernels for Q(A)·V


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise VitqError(f"log kernels need integer codes, got {codes.dtype}")
    if codes.numel() and int(codes.min()) < 0:
        raise VitqError("log codes must be >= 0")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise VitqError(f"bits must be a positive integer, got {bits!r}")


def _shift_accumulate(selected: torch.Tensor, exponents: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_j 2^(−e_ij)·V_j over the entries ``selected`` (bool [..., M, K]) with exponents ``e`` ([..., M, K]).

    Grouped by exponent: for each exponent e the rows of V whose code has that exponent are *added*
    (a 0/1 mask times V: additions only), then the partial sum is shifted by e (``torch.ldexp``).
    """
    out_shape = torch.broadcast_shapes(selected.shape[:-2], v.shape[:-2]) + (selected.shape[-2], v.shape[-1])
    acc = torch.zeros(out_shape, dtype=v.dtype, device=v.device)
    if not bool(selected.any()):
        return acc
    for e in torch.unique(exponents[selected]).tolist():
        members = (selected & (exponents == e)).to(v.dtype)
        partial = members @ v  # sum of the V rows in this bucket: additions only
        acc += torch.ldexp(partial, torch.tensor(-e, dtype=v.dtype, device=v.device))
    return acc


def log2_attention_matmul(codes: torch.Tensor, scale: torch.Tensor | float, v: torch.Tensor,
                          bits: int) -> torch.Tensor:
    """Q(A)·V from log2 codes of A ([..., M, K]) and V ([..., K, D]) with shifts only:
    ``Δ·Σ_{q_ij < n} 2^(−q_ij)·V_j``; codes ≥ n (zero) contribute nothing."""
    _check_codes(codes, bits)
    valid = codes < 2**bits
    acc = _shift_accumulate(valid, codes.long(), v)
    return acc * torch.as_tensor(scale, dtype=v.dtype, device=v.device).reshape(())


def log_sqrt2_attention_matmul(codes: torch.Tensor, scale: torch.Tensor | float, v: torch.Tensor,
                               bits: int) -> torch.Tensor:
    """Q(A)·V from log√2 codes of A ([..., M, K]) and V ([..., K, D]), as a log2 shift kernel.

    Even code 2m → V·2^(−m); odd code 2m−1 → V·2^(−m)·√2. Both sets are accumulated with shifts, and
    the odd partial sum is multiplied by √2 once per output element (RepQ-ViT's reparameterisation)::

        Q(A)·V = Δ·(E + √2·O),  E = Σ_{q even} 2^(−q/2)·V,  O = Σ_{q odd} 2^(−ceil(q/2))·V
    """
    _check_codes(codes, bits)
    valid = codes < 2**bits
    odd = (codes % 2) == 1
    exponents = torch.div(codes.long() + 1, 2, rounding_mode="floor")  # ceil(q/2)
    even_sum = _shift_accumulate(valid & ~odd, exponents, v)
    odd_sum = _shift_accumulate(valid & odd, exponents, v)
    return (even_sum + odd_sum * SQRT2) * torch.as_tensor(scale, dtype=v.dtype, device=v.device).reshape(())


# ------------------------------------------------------------------ quantizers


class LogQuantizer(Quantizer):
    """Shared machinery of the per-tensor log quantizers (subclasses set the step and level formula)."""

    param_names = ("scale",)
    #: quantization steps per octave: 1 for log2, 2 for log√2
    steps_per_octave: int = 1

    def __init__(
        self,
        bits: int,
        search_percentiles: Sequence[float] = REPQ_PERCENTILES,
        fixed_scales: Sequence[float] = (),
    ) -> None:
        try:
            search_percentiles = tuple(float(p) for p in search_percentiles)
            fixed_scales = tuple(float(s) for s in fixed_scales)
        except (TypeError, ValueError):
            raise VitqError("search_percentiles and fixed_scales must be sequences of numbers") from None
        for p in search_percentiles:
            if not 0.5 < p <= 1.0:
                raise VitqError(f"percentiles must be in (0.5, 1], got {p!r}")
        for s in fixed_scales:
            if not (math.isfinite(s) and s > 0):
                raise VitqError(f"fixed scales must be finite and > 0, got {s!r}")
        if not search_percentiles and not fixed_scales:
            raise VitqError("a log quantizer needs at least one search percentile or fixed scale")
        super().__init__(bits, search_percentiles=list(search_percentiles), fixed_scales=list(fixed_scales))
        self.search_percentiles, self.fixed_scales = search_percentiles, fixed_scales

    @property
    def n_levels(self) -> int:
        """n = 2^b non-zero levels (codes 0..n−1)."""
        return 2**self.bits

    @property
    def zero_code(self) -> int:
        """The code of x̂ = 0 (underflow): n."""
        return 2**self.bits

    # --------------------------------------------------------------- formulas
    def _values(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The non-zero level values of float codes ``q`` in 0..n−1 (in place on ``q``)."""
        raise NotImplementedError

    def _levels(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        n = self.n_levels
        return self._values(codes.clamp(0, n - 1).float(), scale).masked_fill_(codes >= n, 0.0)

    def _fake_quant(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``dequantize(int_repr(x))`` without the int32 round trip: the same float codes go to the levels
        (post-Softmax maps are the largest activations, so each pass over them counts)."""
        exponent, zero = log_exponents(x, scale, self.bits, self.steps_per_octave)
        return self._values(exponent, scale).masked_fill_(zero, 0.0).to(x.dtype)

    def _scale(self) -> torch.Tensor:
        return self.scale.reshape(())

    # --------------------------------------------------------------- calibration
    def search_candidates(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Δ candidates: the quantiles of ``x`` at ``search_percentiles``, then ``fixed_scales``."""
        flat = x.detach().float().reshape(1, -1)
        candidates = []
        if self.search_percentiles:
            if flat.numel() == 0:
                raise VitqError("cannot calibrate a log quantizer on an empty tensor")
            tails = TailQuantiles(flat, min(self.search_percentiles))
            candidates += [tails.range(p)[1] for p in self.search_percentiles]
        candidates += [torch.tensor([s], device=flat.device) for s in self.fixed_scales]
        return [{"scale": c.reshape(1).clamp_min(MIN_SCALE)} for c in candidates]

    def calibrate(self, x: torch.Tensor) -> None:
        """RepQ-ViT: keep the candidate Δ with the lowest ‖x − Q(x)‖² (the first one on ties)."""
        x = x.detach().float()
        candidates = self.search_candidates(x)
        errors = [self._fake_quant(x, params["scale"].reshape(())).sub_(x).square_().sum() for params in candidates]
        self.set_params(candidates[first_minimum(errors)])

    # --------------------------------------------------------------- quantization
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Codes 0..n−1 for the non-zero levels, :attr:`zero_code` (= n) for x̂ = 0 (int32)."""
        return log_codes(x, self._scale(), self.bits, self.steps_per_octave)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Level values of codes (any code ≥ n is zero; negative codes are read as 0)."""
        return self._levels(codes, self._scale())

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quant(x, self._scale())

    def attention_matmul(self, codes: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Q(A)·V from this quantizer's codes of A with the integer shift kernel."""
        raise NotImplementedError


@register_quantizer("log2")
class Log2Quantizer(LogQuantizer):
    """log2 quantizer: x̂ = Δ·2^(−q), q = clamp(round(−log2(x/Δ)), 0, n−1); x̂ = 0 where round(·) ≥ n."""

    steps_per_octave = 1

    def _values(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return log2_values(q, scale)

    def attention_matmul(self, codes: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return log2_attention_matmul(codes, self._scale(), v, self.bits)


@register_quantizer("log_sqrt2")
class LogSqrt2Quantizer(LogQuantizer):
    """RepQ-ViT's log√2 quantizer: q = clamp(round(−2·log2(x/Δ)), 0, n−1),
    x̂ = Δ·2^(−ceil(q/2))·(1 + (q mod 2)(√2−1)) = Δ·2^(−q/2); x̂ = 0 where round(·) ≥ n."""

    steps_per_octave = 2

    def _values(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return log_sqrt2_values(q, scale)

    def attention_matmul(self, codes: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return log_sqrt2_attention_matmul(codes, self._scale(), v, self.bits)
