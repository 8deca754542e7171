"""Integer-only kernels in the style of I-ViT (Li & Gu, ICCV 2023): every op takes and returns integer tensors.

A real value is an integer code times a scale known at compile time (``x ≈ S·I``); scales never appear at run
time except folded into integer multipliers. All tensors are ``torch.int64`` (values stay within int32 except
inside a product, where int64 holds the widening); only the compile step (:func:`dyadic`) touches floats.

- :func:`requantize`: ``round(I·M)`` for a real multiplier ``M ≈ m / 2^k`` (a *dyadic* number): one integer
  multiply, an add and a right shift — how an int32 accumulator becomes the next layer's 8-bit code.
- :func:`shift_exp`: ``e^x`` for ``x = S·I ≤ 0`` with shifts only (I-ViT's ShiftExp): ``x·log2(e) ≈ x + x/2 − x/16``,
  then ``2^(−t) = 2^(−q)·2^(−r)`` (``q`` integer, ``0 ≤ r < 1``) with ``2^(−r) ≈ 1 − r/2``.
- :func:`shiftmax`: softmax from :func:`shift_exp` and one integer division per row.
- :func:`shift_gelu`: ``GELU(x) ≈ x·σ(1.702·x)`` (I-ViT's ShiftGELU), ``1.702 ≈ 1 + 1/2 + 1/8 + 1/16``,
  ``σ`` from :func:`shift_exp` and an integer division.
- :func:`probability_code_book`: a non-uniform softmax quantizer (log2, log√2, TanQ, ...) as two lookups, integer
  probability → code → level, so that its codes need no float operation at run time.
- :func:`integer_layernorm`: integer mean and variance, integer square root (:func:`isqrt`, Newton's method on
  integers, exact), and the affine part folded into per-channel integer multipliers.
"""

from __future__ import annotations

import math

import torch

from vitq.quantizers import Quantizer

#: fractional bits of the dyadic multipliers (m has about this many significant bits)
MULTIPLIER_BITS = 30
#: fixed-point bits of shift_exp's output (1.0 = 2^EXP_BITS)
EXP_BITS = 15
#: fixed-point bits of probabilities / sigmoid values (1.0 = 2^PROB_BITS)
PROB_BITS = 16
#: shift_exp needs ``1/S`` (the integer count of units per 1.0) to be at least this large for resolution
MIN_UNITS_PER_ONE = 1024


def probability_code_book(quantizer) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The codes of ``quantizer`` for every probability ``i·2^−PROB_BITS`` (``i = 0..2^PROB_BITS``, int64) and
    the level of each code ``0..max`` (float64): its fake-quant on that probability grid as two table lookups.
    Or why it has none: the quantizer must define integer codes (``int_repr``) with one set of parameters, and
    give non-negative codes to probabilities."""
    if quantizer is None or type(quantizer).int_repr is Quantizer.int_repr \
            or any(getattr(quantizer, name).numel() != 1 for name in quantizer.param_names):
        return "needs a per-tensor quantizer with integer codes (uniform, log2, log_sqrt2, tanq, ...)"
    with torch.no_grad():
        probabilities = torch.arange(2**PROB_BITS + 1, dtype=torch.float64) / 2**PROB_BITS
        device = next(quantizer.buffers()).device
        code_table = quantizer.int_repr(probabilities.float().to(device)).to(torch.int64)
        if int(code_table.min()) < 0:
            return "gives negative codes to probabilities"
        levels = quantizer.dequantize(torch.arange(int(code_table.max()) + 1, device=device)).double()
    return code_table, levels


def dyadic(multiplier: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, k)`` int64 with ``m / 2^k ≈ multiplier`` (> 0) and ``m`` of :data:`MULTIPLIER_BITS` bits."""
    value = torch.as_tensor(multiplier, dtype=torch.float64)
    if not bool((value > 0).all()):
        raise ValueError("dyadic multipliers must be positive")
    exponent = torch.floor(torch.log2(value))
    shift = (MULTIPLIER_BITS - 1 - exponent).to(torch.int64)
    mantissa = torch.round(value * torch.pow(2.0, shift.double())).to(torch.int64)
    return mantissa, shift


def rounding_shift(value: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """``round(value / 2^shift)`` (half up) for non-negative ``shift``, with an add and an arithmetic shift."""
    shift = torch.as_tensor(shift, dtype=torch.int64)
    half = torch.where(shift > 0, torch.ones_like(shift) << (shift - 1).clamp_min(0), torch.zeros_like(shift))
    return (value + half) >> shift


def requantize(acc: torch.Tensor, mantissa: torch.Tensor, shift: torch.Tensor, zero_point: int = 0,
               q_min: int | None = None, q_max: int | None = None) -> torch.Tensor:
    """``clamp(round(acc · m / 2^k) + z, q_min, q_max)`` — an integer accumulator to the codes of another scale.

    ``mantissa``/``shift`` broadcast against ``acc`` (per-channel multipliers along the last axis)."""
    out = rounding_shift(acc * mantissa, shift) + zero_point
    if q_min is not None or q_max is not None:
        out = out.clamp(q_min, q_max)
    return out


def integer_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int64 tensors, exactly, on any device. The CPU multiplies int64 directly; CUDA has no integer
    matrix product, so there the operands go through float64: they are codes minus zero points (at most 9 bits
    for the 2..8-bit grids) or a softmax code times a value code, so every product is below 2^18 and every
    partial sum of up to 2^34 of them is an integer below 2^53, which float64 holds exactly in any summation
    order."""
    if a.device.type == "cpu":
        return a @ b
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int64)


def integer_division(numerator: torch.Tensor, denominator: torch.Tensor | int) -> torch.Tensor:
    """``round(numerator / denominator)`` for non-negative numerator and positive denominator."""
    return torch.div(numerator + denominator // 2, denominator, rounding_mode="floor")


def isqrt(value: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(value))`` element-wise for int64 ``value ≥ 0``: Newton's iteration on integers, started above
    the root (2^ceil(bits/2)), is monotone decreasing and stops at the floor of the root."""
    bits = int(value.max().item()).bit_length() if value.numel() else 0
    root = torch.full_like(value, 1 << ((bits + 1) // 2))
    while True:
        nxt = (root + value // root.clamp_min(1)) >> 1
        done = nxt >= root
        root = torch.where(done, root, nxt)
        if bool(done.all()):
            return torch.where(value > 0, root, torch.zeros_like(root))


def units_per_one(scale: float) -> tuple[int, int]:
    """``(shift, I_0)``: left shift for codes of ``scale`` so that one unit is ``scale/2^shift`` and
    ``I_0 = round(2^shift/scale) ≥ MIN_UNITS_PER_ONE`` units make 1.0 (compile time)."""
    shift = max(0, math.ceil(math.log2(MIN_UNITS_PER_ONE * scale)))
    return shift, round(2**shift / scale)


def shift_exp(codes: torch.Tensor, units_one: int) -> torch.Tensor:
    """``e^x`` in units of ``2^−EXP_BITS`` for ``x = codes / units_one ≤ 0`` (I-ViT's ShiftExp).

    ``t = −x·log2(e)`` in the same units: ``t ≈ −(I + I/2 − I/16)``; ``q = t // I_0`` whole halvings and the
    remainder ``r`` (< I_0): ``2^(−r/I_0) ≈ 1 − r/(2·I_0)``, i.e. ``I_0 − r/2`` units. The result is shifted to
    ``2^EXP_BITS`` per 1.0 and right by ``q``.
    """
    t = -(codes + (codes >> 1) - (codes >> 4))  # ≥ 0 for codes ≤ 0 (the shifts floor toward −∞)
    t = t.clamp_min(0)
    halvings = torch.div(t, units_one, rounding_mode="floor")
    remainder = t - halvings * units_one
    mantissa = units_one - (remainder >> 1)  # in units of 1/I_0, in (I_0/2, I_0]
    scaled = integer_division(mantissa << EXP_BITS, units_one)  # 2^(−r) in 2^−EXP_BITS units
    return scaled >> halvings.clamp_max(62)


def shiftmax(scores: torch.Tensor, units_one: int) -> torch.Tensor:
    """Softmax over the last axis in units of ``2^−PROB_BITS``; ``scores`` are codes with ``units_one`` per 1.0."""
    exp = shift_exp(scores - scores.amax(dim=-1, keepdim=True), units_one)
    return integer_division(exp << PROB_BITS, exp.sum(dim=-1, keepdim=True).clamp_min(1))


def shift_gelu(codes: torch.Tensor, units_one: int) -> torch.Tensor:
    """``GELU(x)`` ≈ ``x·σ(1.702x)`` for ``x = codes/units_one``, in units of ``1/(units_one·2^PROB_BITS)``."""
    y = codes + (codes >> 1) + (codes >> 3) + (codes >> 4)  # ≈ 1.6875·x, the sigmoid's argument
    e = shift_exp(-y.abs(), units_one)  # e^(−|y|) in 2^−EXP_BITS units
    one = 1 << EXP_BITS
    # σ(y) = 1/(1 + e^−y) for y ≥ 0, e^y/(1 + e^y) for y < 0
    numerator = torch.where(y >= 0, torch.full_like(e, one), e) << PROB_BITS
    sigmoid = integer_division(numerator, e + one)
    return codes * sigmoid


def integer_layernorm(codes: torch.Tensor, gain: torch.Tensor, gain_bits: int, offset: torch.Tensor,
                      eps_units: int, q_min: int, q_max: int) -> torch.Tensor:
    """LayerNorm over the last axis straight to the next quantizer's codes.

    ``gain = round(γ_c / s_out · 2^gain_bits)``, ``offset = round(β_c / s_out) + z_out`` (compile time);
    ``eps_units = round(ε / s_in²)``. ``out = round((x − μ)·gain / (σ·2^gain_bits)) + offset``, with
    ``μ`` and ``σ² = mean((x − μ)²) + ε`` computed on the integer codes and ``σ`` by :func:`isqrt`.
    """
    channels = codes.shape[-1]
    mean = torch.div(codes.sum(dim=-1, keepdim=True) + channels // 2, channels, rounding_mode="floor")
    centred = codes - mean
    variance = torch.div((centred * centred).sum(dim=-1, keepdim=True), channels, rounding_mode="floor")
    std = isqrt(variance + eps_units).clamp_min(1)
    numerator = centred * gain
    denominator = std << gain_bits
    # round half up for either sign: floor((2n + d) / 2d)
    normalised = torch.div(2 * numerator + denominator, 2 * denominator, rounding_mode="floor")
    return (normalised + offset).clamp(q_min, q_max)
