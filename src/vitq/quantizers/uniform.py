"""Uniform affine quantizer: x̂ = (clamp(round(x/Δ) + z, q_min, q_max) − z) · Δ.

Options:
- ``signed``: codes in [−2^(b−1), 2^(b−1)−1] instead of [0, 2^b−1];
- ``symmetric``: zero point 0 and Δ = max(|lo|, |hi|) / q_max (signed) or hi / q_max (unsigned);
  asymmetric: Δ = (hi − lo)/(q_max − q_min), z = q_min − round(lo/Δ);
- ``granularity``: ``"tensor"`` (one Δ), ``"channel"`` (one Δ per index of ``axis``; for weights
  axis 0 = per output channel), ``"head"`` (``axis`` split into ``groups`` contiguous groups,
  e.g. the heads of a q/k/v channel dimension) or ``"group"`` (weights: each output row, i.e. index of
  axis 0, split into contiguous groups of ``group_size`` of its flattened elements, as GPTQ's group size);
- ``init``: the range initialiser (``"minmax"``, ``"percentile"`` at ``percentile``, or
  ``"mse"``: RepQ-ViT's search over ``search_percentiles``, see :mod:`vitq.quantizers.ranges`).

Like RepQ-ViT, the asymmetric range is not forced to contain 0 (its zero point may fall outside
the code range); a degenerate range (a constant channel, docs/protocol.md#constant-layernorm-channels) is widened to
include 0 so that the constant is still represented exactly and Δ never collapses to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer
from vitq.quantizers.ranges import REPQ_PERCENTILES, minmax_range, mse_range_search, percentile_range
from vitq.quantizers.registry import register_quantizer

GRANULARITIES = ("tensor", "channel", "head", "group")
INITS = ("minmax", "percentile", "mse")
#: smallest step; keeps Δ > 0 for all-zero groups
MIN_SCALE = 1e-8


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def uniform_params(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step Δ and zero point z for clipping ranges [lo, hi] (vectorised)."""
    q_min, q_max = code_range(bits, signed)
    degenerate = (hi - lo) <= MIN_SCALE * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    lo = torch.where(degenerate, lo.clamp(max=0.0), lo)
    hi = torch.where(degenerate, hi.clamp(min=0.0), hi)
    if symmetric:
        bound = torch.maximum(lo.abs(), hi.abs()) if signed else hi.clamp_min(0.0)
        steps = q_max
    else:
        bound = hi - lo
        steps = q_max - q_min
    scale = (bound / steps).clamp_min(MIN_SCALE)
    # A degenerate group holds one value c: step |c| / 2^k for the largest 2^k <= steps, so that c is
    # exactly the code ±2^k (dividing by a power of two is exact; |c| / steps · steps need not be).
    # Near the bottom of the float range (|c| / 2^k subnormal) the step is |c| itself.
    exact = bound / 2 ** (steps.bit_length() - 1)
    exact = torch.where(exact >= torch.finfo(exact.dtype).tiny, exact, bound)
    scale = torch.where(degenerate & (bound > 0), exact, scale)
    if symmetric:
        return scale, torch.zeros_like(scale)
    return scale, q_min - torch.round(lo / scale)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int):
    """(clamp(round(x/Δ) + z, q_min, q_max) − z)·Δ, in place on one fresh buffer: activations are large, and
    each fresh buffer of their size costs about as much as the arithmetic (page faults)."""
    out = (x / scale).round_()
    return out.add_(zero_point).clamp_(q_min, q_max).sub_(zero_point).mul_(scale)


def integer_grid_problem(quantizer, *, per_row: bool) -> str | None:
    """Why ``quantizer`` is not a plain integer affine quantizer — codes ``clamp(round(x/Δ) + z)`` with integer
    zero points, one (Δ, z) per tensor or, with ``per_row``, per output row — or ``None`` when it is. The
    deployment paths (ONNX QDQ, the integer-only runtime) need exactly this."""
    kind = getattr(quantizer, "kind", None)
    if kind != UniformQuantizer.kind:  # subclasses (noisy_uniform) compute more than a grid
        return "float (not quantized)" if quantizer is None else f"{kind} quantizer (not uniform)"
    allowed = ("tensor", "channel") if per_row else ("tensor",)
    if quantizer.granularity not in allowed or (quantizer.granularity == "channel" and quantizer.axis != 0):
        return f"per-{quantizer.granularity} scales (here: per tensor" + \
            (", or per output channel for weights)" if per_row else " for activations)")
    zero_point = quantizer.zero_point.detach().reshape(-1)
    if not bool((zero_point == zero_point.round()).all()):
        # RepQ-ViT's unrounded reparameterization target z̃: its clamp bounds (q_min − z̃)·Δ are off the grid
        return f"fractional zero point (e.g. {zero_point[zero_point != zero_point.round()][0].item():.3f}); " \
               f"an integer one is needed"
    return None


@register_quantizer("uniform")
class UniformQuantizer(Quantizer):
    param_names = ("scale", "zero_point")

    def __init__(
        self,
        bits: int,
        signed: bool = False,
        symmetric: bool = False,
        granularity: str = "tensor",
        axis: int = 0,
        groups: int = 1,
        init: str = "minmax",
        percentile: float = 0.9999,
        search_percentiles: Sequence[float] = REPQ_PERCENTILES,
        group_size: int | None = None,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise VitqError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if init not in INITS:
            raise VitqError(f"init must be one of {INITS}, got {init!r}")
        if granularity == "head" and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
            raise VitqError(f"per-head quantization needs an integer groups >= 1, got {groups!r}")
        if (granularity == "group") != (group_size is not None):
            raise VitqError("group_size is required by, and only used with, granularity='group'")
        if granularity == "group" and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise VitqError(f"group_size must be an integer >= 1, got {group_size!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise VitqError(f"axis must be an integer, got {axis!r}")
        search_percentiles = tuple(float(p) for p in search_percentiles)
        for p in (percentile, *search_percentiles):
            if not 0.5 < p <= 1.0:
                raise VitqError(f"percentiles must be in (0.5, 1], got {p!r}")
        if init == "mse" and not search_percentiles:
            raise VitqError("init='mse' needs at least one search percentile")
        extra = {} if group_size is None else {"group_size": group_size}
        super().__init__(bits, signed=signed, symmetric=symmetric, granularity=granularity, axis=axis,
                         groups=groups, init=init, percentile=percentile,
                         search_percentiles=list(search_percentiles), **extra)
        self.signed, self.symmetric = signed, symmetric
        self.granularity, self.axis, self.groups, self.group_size = granularity, axis, groups, group_size
        self.init, self.percentile, self.search_percentiles = init, percentile, search_percentiles
        self.q_min, self.q_max = code_range(bits, signed)

    # --------------------------------------------------------------- group layout
    def group_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a [groups, elements] matrix, one row per quantization group."""
        if self.granularity == "tensor":
            return x.reshape(1, -1)
        if self.granularity == "group":
            return self._row_groups(x).reshape(-1, self.group_size)
        if not -x.ndim <= self.axis < x.ndim:
            raise VitqError(f"axis {self.axis} is out of range for a {x.ndim}-d tensor")
        channels_first = x.movedim(self.axis, 0)
        n_rows = channels_first.shape[0] if self.granularity == "channel" else self.groups
        if channels_first.shape[0] % n_rows:
            raise VitqError(f"cannot split {channels_first.shape[0]} channels into {n_rows} heads")
        return channels_first.reshape(n_rows, -1)

    def _row_groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as [rows, groups per row, group_size] (granularity ``"group"``)."""
        rows = x.reshape(x.shape[0], -1)
        if rows.shape[1] % self.group_size:
            raise VitqError(f"cannot split rows of {rows.shape[1]} elements into groups of {self.group_size}")
        return rows.reshape(x.shape[0], -1, self.group_size)

    def broadcast(self, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-group parameter reshaped to broadcast against ``x``."""
        if self.granularity == "tensor":
            return param.reshape(())
        if self.granularity == "group":
            shape = self._row_groups(x).shape
            return param.reshape(shape[0], shape[1], 1).expand(shape).reshape(x.shape)
        axis = self.axis % x.ndim
        channels = x.shape[axis]
        if self.granularity == "head":
            param = param.repeat_interleave(channels // param.numel())
        shape = [1] * x.ndim
        shape[axis] = channels
        return param.reshape(shape)

    # --------------------------------------------------------------- calibration
    def _quantize_rows(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale, zero_point = uniform_params(lo, hi, self.bits, self.signed, self.symmetric)
        return fake_quant(rows, scale[:, None], zero_point[:, None], self.q_min, self.q_max)

    def fit_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group clipping ranges ``(lo, hi)`` of ``x`` by the range initialiser (nothing is installed)."""
        rows = self.group_rows(x.detach().float())
        if self.init == "minmax":
            return minmax_range(rows)
        if self.init == "percentile":
            return percentile_range(rows, self.percentile)
        return mse_range_search(rows, self._quantize_rows, self.search_percentiles)

    def calibrate(self, x: torch.Tensor) -> None:
        self.set_range(*self.fit_range(x))

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set Δ and z from per-group clipping ranges."""
        self.scale, self.zero_point = uniform_params(lo, hi, self.bits, self.signed, self.symmetric)

    # --------------------------------------------------------------- quantization
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.broadcast(self.scale, x), self.broadcast(self.zero_point, x)
        return torch.clamp(torch.round(x / scale) + zero_point, self.q_min, self.q_max).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.broadcast(self.scale, codes), self.broadcast(self.zero_point, codes)
        return (codes.float() - zero_point) * scale

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.broadcast(self.scale, x), self.broadcast(self.zero_point, x),
                          self.q_min, self.q_max)
