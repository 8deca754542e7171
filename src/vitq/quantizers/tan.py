"""TanQ (reconstructed): a tangent-based, look-up-table quantizer for post-Softmax probabilities.

DopQ-ViT (arXiv 2408.03291) replaces RepQ-ViT's log√2 post-Softmax quantizer by "TanQ", a quantizer
"based on the tangent function" that keeps levels dense near 0 *and* near 1 (the rare large
attention probabilities). The paper's exact formula is not available (no public code, docs/methods/dopq-vit.md), so
this is a **reconstruction** from those stated properties, with two selectable maps. Inputs are
x ∈ [0, 1]; one per-tensor clip ``clip`` and one shape parameter ``shape``; ``b`` bits, n = 2^b codes.
Inputs are first clamped to [0, clip]; write t = x / clip ∈ [0, 1].

``variant="tan"`` (docs/methods/dopq-vit.md reconstruction; ``shape`` = α ∈ (0, 1), steepness)::

    f(x) = tan(α·π·(x/clip − 0.5)) / tan(α·π/2)              # [0, clip] → [−1, 1], steep at both ends
    q    = clamp(round((f + 1)/2 · (n − 1)), 0, n − 1)        # uniform in f
    x̂    = clip · (0.5 + atan((2q/(n − 1) − 1) · tan(α·π/2)) / (α·π))

  Levels increase with the code; code 0 is exactly 0 and code n − 1 exactly ``clip``; the gaps shrink
  towards both ends (dense near 0 and near clip).

``variant="tan_log"`` (docs/protocol.md#softmax-quantizers-alone, the variant with the lowest attention-output MSE
at 4 bits on DeiT-tiny;
``shape`` = c > 0)::

    u = −log2(x/clip) ≥ 0                                     # log domain (u = ∞ at x = 0)
    k = clamp(round((2/π) · atan(u/c) · (n − 1)), 0, n − 1)   # uniform in atan(u/c): fine near x = clip
    x̂ = clip · 2^(−c · tan(k/(n − 1) · π/2)),  and the top code k = n − 1 means x̂ = 0

  Levels *decrease* with the code: code 0 is ``clip``, code n − 1 is exactly 0; near 0 the levels are
  power-law (log2-like) spaced, near clip finer than log2. Levels so small that they underflow the
  float type become 0 too (several codes may then share the value 0).

For both maps x = 0 dequantizes to exactly 0 (code 0 for "tan", code n − 1 for "tan_log"), x ≥ clip
to exactly ``clip``, and no NaN arises at x = 0 or x = clip. Dequantization is a table of n values
(:meth:`TanQuantizer.levels`, indexed by code), so ``dequantize(int_repr(x)) == forward(x)`` exactly
and hardware needs a LUT, not a shift.

Calibration (:meth:`TanQuantizer.calibrate`) picks (clip, shape) on the grid
{q_p(x) for p in ``clip_percentiles``, max(x), 1.0} × ``shapes`` by the squared error of x itself;
:meth:`TanQuantizer.search_candidates` returns the whole grid so a method can choose by a downstream
error instead (e.g. the attention output, :func:`vitq.calib.search.search_by_output_error`).

**Swapping the map:** a map is a :class:`TanMap` (``codes`` from normalised inputs t = x/clip, the
normalised ``levels`` table, the default shape grid and a shape validity check). To try another
formula (e.g. the one in the paper's PDF), subclass :class:`TanMap`, add an instance to
:data:`TAN_MAPS` under a new name, and select it with ``variant=<name>``; calibration, the search
harness, the LUT and the state dict do not change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import ClassVar

import torch

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer, first_minimum
from vitq.quantizers.ranges import TailQuantiles
from vitq.quantizers.registry import register_quantizer

#: default clip candidates besides max(x) and 1.0
DEFAULT_CLIP_PERCENTILES: tuple[float, ...] = (0.999, 0.9999)
#: smallest usable clip (an all-zero calibration tensor falls back to the other candidates)
MIN_CLIP = 1e-12


class TanMap:
    """One companding map of [0, 1] onto n codes, with its inverse as a table of n levels."""

    name: ClassVar[str] = ""
    #: what the shape parameter means (for error messages)
    shape_doc: ClassVar[str] = ""
    default_shapes: ClassVar[tuple[float, ...]] = ()

    def valid_shape(self, s: float) -> bool:
        raise NotImplementedError

    def codes(self, t: torch.Tensor, s: float, n: int) -> torch.Tensor:
        """Float codes (integers in [0, n − 1]) of normalised inputs ``t`` ∈ [0, 1]."""
        raise NotImplementedError

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        """The shape-independent part of :meth:`codes` (default: ``t`` itself), computed once per clip and
        shared by every shape of a search (:meth:`codes_from`)."""
        return t

    def codes_from(self, prepared: torch.Tensor, s: float, n: int) -> torch.Tensor:
        """``codes(t, s, n)`` from ``prepared = prepare(t)``; must not modify ``prepared``."""
        return self.codes(prepared, s, n)

    def levels(self, s: float, n: int) -> torch.Tensor:
        """The n normalised dequantized values in [0, 1], indexed by code (float64)."""
        raise NotImplementedError


class TanMapSymmetric(TanMap):
    """``"tan"``: f(t) = tan(α·π·(t − 0.5)) / tan(α·π/2), uniform in f (docs/methods/dopq-vit.md)."""

    name = "tan"
    shape_doc = "alpha in (0, 1)"
    default_shapes = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.96, 0.98, 0.995)

    def valid_shape(self, s: float) -> bool:
        return 0.0 < s < 1.0

    def codes(self, t: torch.Tensor, s: float, n: int) -> torch.Tensor:
        return self.codes_from(t, s, n)

    def codes_from(self, prepared: torch.Tensor, s: float, n: int) -> torch.Tensor:
        # f = tan((t − 0.5)·απ) / tan(απ/2); q = round((f + 1)·(n − 1)/2): in place on one fresh tensor
        f = (prepared - 0.5).mul_(s * math.pi).tan_().div_(math.tan(s * math.pi / 2))
        return f.add_(1.0).mul_((n - 1) / 2).round_().clamp_(0, n - 1)

    def levels(self, s: float, n: int) -> torch.Tensor:
        grid = torch.arange(n, dtype=torch.float64) * (2.0 / (n - 1)) - 1.0
        out = 0.5 + torch.atan(grid * math.tan(s * math.pi / 2)) / (s * math.pi)
        out = out.clamp_(0.0, 1.0)
        out[0], out[-1] = 0.0, 1.0  # exact in real arithmetic
        return out


class TanMapLog(TanMap):
    """``"tan_log"``: u = −log2(t), uniform in atan(u/c) (docs/protocol.md#softmax-quantizers-alone)."""

    name = "tan_log"
    shape_doc = "c > 0"
    default_shapes = tuple(0.25 * 32.0 ** (i / 9) for i in range(10))  # 0.25 .. 8, log-spaced

    def valid_shape(self, s: float) -> bool:
        return 0.0 < s < math.inf

    def codes(self, t: torch.Tensor, s: float, n: int) -> torch.Tensor:
        return self.codes_from(self.prepare(t), s, n)

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log2(t).neg_()  # u = −log2(t): +inf at t = 0 → atan = π/2 → top code

    def codes_from(self, prepared: torch.Tensor, s: float, n: int) -> torch.Tensor:
        # k = round(atan(u/c)·(n − 1)·2/π): in place on the one fresh tensor u/c
        return (prepared / s).atan_().mul_((n - 1) * 2 / math.pi).round_().clamp_(0, n - 1)

    def levels(self, s: float, n: int) -> torch.Tensor:
        k = torch.arange(n, dtype=torch.float64)
        out = torch.exp2(-s * torch.tan(k * (math.pi / 2 / (n - 1))))
        out[0], out[-1] = 1.0, 0.0
        return out


#: the selectable maps, by ``variant`` name
TAN_MAPS: dict[str, TanMap] = {m.name: m for m in (TanMapSymmetric(), TanMapLog())}


@lru_cache(maxsize=1024)
def _level_table(tan_map: TanMap, n: int, clip: float, s: float, device: torch.device) -> torch.Tensor:
    """The n dequantized values ``levels(s, n)·clip`` (float32, computed in float64 on the CPU, then moved to
    ``device`` once); cached per (map, n, clip, shape, device), so neither a search nor a forward pass rebuilds
    or re-uploads it for every call. Shared: never modify the result."""
    return (tan_map.levels(s, n) * clip).float().to(device)


@register_quantizer("tanq")
class TanQuantizer(Quantizer):
    """TanQ (reconstructed): per-tensor LUT quantizer for post-Softmax probabilities (see module doc).

    Options: ``variant`` ("tan_log" default, or "tan"; any key of :data:`TAN_MAPS`), ``shapes`` (the
    shape grid, default the map's ``default_shapes``), ``clip_percentiles`` (clip candidates besides
    max(x) and 1.0). Buffers: ``clip`` and ``shape`` (0-d float32).
    """

    param_names = ("clip", "shape")

    def __init__(
        self,
        bits: int,
        variant: str = "tan_log",
        shapes: Sequence[float] | None = None,
        clip_percentiles: Sequence[float] = DEFAULT_CLIP_PERCENTILES,
    ) -> None:
        if variant not in TAN_MAPS:
            raise VitqError(f"unknown TanQ variant {variant!r}; known: {', '.join(sorted(TAN_MAPS))}")
        tan_map = TAN_MAPS[variant]
        try:
            grid = tuple(float(s) for s in (tan_map.default_shapes if shapes is None else shapes))
            percentiles = tuple(float(p) for p in clip_percentiles)
        except (TypeError, ValueError):
            raise VitqError("TanQ shapes and clip_percentiles must be sequences of numbers") from None
        if not grid:
            raise VitqError("TanQ needs at least one shape value")
        for s in grid:
            # the buffer is float32: its rounding must be valid too (0.99999999 rounds to α = 1)
            if not (tan_map.valid_shape(s) and tan_map.valid_shape(float(torch.tensor(s, dtype=torch.float32)))):
                raise VitqError(f"TanQ variant {variant!r} needs shapes with {tan_map.shape_doc}, got {s!r}")
        for p in percentiles:
            if not 0.5 < p <= 1.0:
                raise VitqError(f"clip percentiles must be in (0.5, 1], got {p!r}")
        super().__init__(bits, variant=variant, shapes=None if shapes is None else list(grid),
                         clip_percentiles=list(percentiles))
        self.variant, self.map = variant, tan_map
        self.shapes, self.clip_percentiles = grid, percentiles
        self.n = 2**bits

    # --------------------------------------------------------------- table
    def _table(self, clip: float, s: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """The n dequantized values for (clip, shape), float32 on ``device`` (cached: do not modify)."""
        return _level_table(self.map, self.n, clip, s, torch.device(device))

    def levels(self) -> torch.Tensor:
        """The n dequantized values, indexed (sorted) by code: increasing for "tan", decreasing for "tan_log"."""
        if not self.is_calibrated:
            raise VitqError(f"{type(self).__name__} used before calibration")
        return self._table(float(self.clip), float(self.shape), self.clip.device).clone()

    # --------------------------------------------------------------- quantization
    def _prepared(self, x: torch.Tensor, clip: float) -> torch.Tensor:
        """The shape-independent part of the codes of ``x`` for ``clip`` (float32 arithmetic)."""
        return self.map.prepare(x.detach().float().clamp(0.0, clip).div_(clip))

    def _codes(self, x: torch.Tensor, clip: float, s: float) -> torch.Tensor:
        """Integer-valued float codes of ``x`` (float32 arithmetic)."""
        return self.map.codes_from(self._prepared(x, clip), s, self.n)

    def _lookup(self, codes: torch.Tensor, clip: float, s: float, like: torch.Tensor) -> torch.Tensor:
        table = self._table(clip, s, like.device).to(dtype=like.dtype)
        return torch.take(table, codes.long())  # = table[codes.long()], without advanced indexing

    def _fake_quant(self, x: torch.Tensor, clip: float, s: float) -> torch.Tensor:
        return self._lookup(self._codes(x, clip, s), clip, s, x)

    def _fake_quant_grid(self, x: torch.Tensor, grid: Sequence[tuple[float, float]]) -> Iterator[torch.Tensor]:
        """``_fake_quant(x, clip, s)`` for each ``(clip, s)`` of ``grid`` in turn; the clip-dependent part
        is computed once for consecutive entries with the same clip (the grid is clip-major)."""
        prepared, prepared_clip = None, None
        for clip, s in grid:
            if prepared is None or clip != prepared_clip:
                prepared, prepared_clip = None, clip  # free the previous one first
                prepared = self._prepared(x, clip)
            yield self._lookup(self.map.codes_from(prepared, s, self.n), clip, s, x)

    def fake_quant_candidates(self, x: torch.Tensor,
                              candidates: Sequence[dict[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
        """Q(x) under each candidate in turn, exactly as ``set_params(c)`` then ``quantize_dequantize(x)``
        would give (without installing anything), sharing the work between candidates of the same clip.
        Used by :func:`vitq.calib.search.search_by_output_error`."""
        return self._fake_quant_grid(x, [(float(c["clip"]), float(c["shape"])) for c in candidates])

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        return self._codes(x, float(self.clip), float(self.shape)).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self.levels().to(codes.device)[codes.long()]

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quant(x, float(self.clip), float(self.shape))

    # --------------------------------------------------------------- calibration
    def clip_candidates(self, x: torch.Tensor) -> list[float]:
        """Distinct positive clips: the ``clip_percentiles`` quantiles of x, max(x), and 1.0."""
        flat = x.detach().float().reshape(1, -1)
        values = []
        if flat.numel():
            if self.clip_percentiles:
                tails = TailQuantiles(flat, min(self.clip_percentiles))
                values += [tails.range(p)[1].reshape(()) for p in self.clip_percentiles]
            values.append(flat.max())
        values = torch.stack(values).tolist() if values else []  # one transfer for all the candidates
        values.append(1.0)
        out: list[float] = []
        for v in values:
            if math.isfinite(v) and v >= MIN_CLIP and v not in out:
                out.append(v)
        return out

    def _grid(self, x: torch.Tensor) -> list[tuple[float, float]]:
        return [(clip, s) for clip in self.clip_candidates(x) for s in self.shapes]

    def search_candidates(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Every (clip, shape) of the calibration grid, clip-major, as parameter dicts."""
        device = x.device
        return [{"clip": torch.tensor(clip, dtype=torch.float32, device=device),
                 "shape": torch.tensor(s, dtype=torch.float32, device=device)} for clip, s in self._grid(x)]

    def calibrate(self, x: torch.Tensor) -> None:
        """Pick (clip, shape) on the grid by ‖x − Q(x)‖² (first minimum in grid order)."""
        x = x.detach().float()
        # round-trip through float32 like the buffers, so the error is the one forward() will give
        grid = [(float(torch.tensor(clip, dtype=torch.float32)), float(torch.tensor(s, dtype=torch.float32)))
                for clip, s in self._grid(x)]
        errors = [fq.sub_(x).square_().sum(dtype=torch.float64) for fq in self._fake_quant_grid(x, grid)]
        best = grid[first_minimum(errors)]  # the grid always holds clip = 1.0: never empty
        self.set_params({"clip": torch.tensor(best[0], device=x.device),
                         "shape": torch.tensor(best[1], device=x.device)})
