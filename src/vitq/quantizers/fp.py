"""Low-bit floating-point formats as quantizer kinds: FP8 (E4M3, E5M2), FP4 (E2M1) and the block-scaled MX formats.

A format ``EeMm`` has a sign, ``e`` exponent bits (bias ``2^(e−1) − 1``) and ``m`` mantissa bits. Its values
are ``±2^E·(1 + k/2^m)`` for normal exponents ``E ≥ 1 − bias`` and the subnormals ``±2^(1−bias)·k/2^m``: between
two powers of two the grid is uniform with ``2^m`` steps, so rounding to the format is rounding to a multiple of
``2^(E − m)``, where ``E = max(floor(log2|x|), 1 − bias)`` (:func:`round_to_format`, ties to even as in IEEE
754). Values beyond the range saturate at the largest finite value, as the OCP "satfinite" conversion:
infinities become ±max, NaN stays NaN; the formats as used here have no infinities. The largest values: E4M3
448 (the OCP/NVIDIA ``fn`` variant, which gives the all-ones exponent to normal numbers), E5M2 57344, E2M1 6.

Kinds, each ``x̂ = s·round_to_format(x / s)`` with a scale ``s`` chosen as below:

- ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1`` (:class:`FloatFormatQuantizer`): one calibrated ``s`` per tensor, or
  per output channel (``granularity="channel"``, axis 0) for weights. ``init="minmax"`` maps the largest
  magnitude to the format's largest value (``s = max|x| / max``); ``init="mse"`` searches ``s`` over clipped
  ranges for the lowest squared error. A real-valued ``s`` is the FP analogue of choosing the exponent bias
  (LLM-FP4's search), with finer steps.
- ``fp`` (:class:`FloatSearchQuantizer`, LLM-FP4's format search): a ``bits``-bit float format whose split of
  exponent and mantissa bits is chosen per tensor on the calibration data, with its scale (the real-valued
  exponent bias) searched as ``init="mse"`` does for each candidate format; the format with the lowest squared
  error wins. Every exponent code is a normal number, with no infinities or NaN, as LLM-FP4 counts them: the
  largest value of ``EeMm`` is ``(2 − 2^−m)·2^(2^(e−1))`` (E2M1: 6; E4M3: 480, where the OCP ``fn`` variant
  keeps 448), and E1Mm is a uniform grid.
- ``mxfp8``, ``mxfp4`` (:class:`MXQuantizer`, OCP Microscaling): blocks of 32 consecutive elements along the
  last dimension (the reduction dimension of a Linear's input and weight) share a power-of-two scale
  ``X = 2^(floor(log2 max|block|) − emax)``, ``emax`` the exponent of the element format's largest value; the
  elements are E4M3 (mxfp8) or E2M1 (mxfp4). The scales come from the tensor itself (computed at run time for
  activations, as MX hardware does): nothing is calibrated.
- ``nvfp4`` (:class:`NVFP4Quantizer`): blocks of 16 E2M1 elements, each block's scale an E4M3 number times one
  float32 scale per tensor ``g = max|x| / (448·6)`` (calibrated on activations), so the block scale
  ``round_e4m3(max|block| / (6·g))·g`` maps the block's largest magnitude near E2M1's 6.

A last dimension that is not a multiple of the block is padded with zeros for the scale computation. None of
these kinds has an integer form: the ONNX export keeps them on a float path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer, first_minimum
from vitq.quantizers.registry import register_quantizer

#: smallest scale; keeps x/s finite for an all-zero tensor or channel
MIN_SCALE = 1e-12
#: clipping ratios of the ``init="mse"`` search (fractions of max|x|)
MSE_RATIOS = tuple(1.0 - 0.02 * i for i in range(25))


@dataclass(frozen=True)
class FloatFormat:
    """A sign + ``exponent_bits`` + ``mantissa_bits`` float format whose largest finite value is ``max``."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def min_exponent(self) -> int:
        """The exponent of the smallest normal value, ``1 − bias`` (subnormals share its step)."""
        return 2 - 2 ** (self.exponent_bits - 1)

    @property
    def max_exponent(self) -> int:
        """``floor(log2 max)``: the MX ``emax`` of the format."""
        return math.floor(math.log2(self.max))


E4M3 = FloatFormat("e4m3", 4, 3, 448.0)
E5M2 = FloatFormat("e5m2", 5, 2, 57344.0)
E2M1 = FloatFormat("e2m1", 2, 1, 6.0)


def searched_format(bits: int, exponent_bits: int) -> FloatFormat:
    """The ``bits``-bit format with ``exponent_bits`` exponent bits, every exponent code normal (module notes)."""
    mantissa = bits - 1 - exponent_bits
    if not 1 <= exponent_bits <= bits - 1:
        raise VitqError(f"a {bits}-bit float format has 1 to {bits - 1} exponent bits, got {exponent_bits!r}")
    return FloatFormat(f"e{exponent_bits}m{mantissa}", exponent_bits, mantissa,
                       (2.0 - 2.0**-mantissa) * 2.0 ** (2 ** (exponent_bits - 1)))


def round_to_format(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The value of ``fmt`` nearest to ``x`` (ties to even mantissa), ``±fmt.max`` beyond the range, in x's dtype."""
    magnitude = x.abs().clamp(max=fmt.max)
    exponent = magnitude.clamp_min(torch.finfo(x.dtype).tiny).log2().floor_().clamp_min_(fmt.min_exponent)
    step = exponent.sub_(fmt.mantissa_bits).exp2_()
    # |x| / step is on [2^m, 2^(m+1)) for a normal value: rounding it rounds the mantissa (half to even)
    return magnitude.div_(step).round_().mul_(step).mul_(x.sign())  # sign(): ONNX has no copysign


def _check_bits(kind: str, bits: int | None, fmt: FloatFormat) -> int:
    if bits is not None and bits != fmt.bits:
        raise VitqError(f"quantizer kind {kind!r} has {fmt.bits} bits (it is {fmt.name.upper()}), got bits={bits!r}")
    return fmt.bits


def scale_search(rows: torch.Tensor, fmt: FloatFormat, init: str,
                 granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale of each row of ``rows`` ([rows, n]; one row per tensor) for ``fmt`` and its squared error:
    ``max|row| / fmt.max`` (``minmax``), or the clipping ratio of :data:`MSE_RATIOS` with the lowest error
    (``mse``; one ratio for the whole tensor unless ``granularity`` is ``channel``)."""
    amax = rows.abs().amax(dim=1)
    ratios = (1.0,) if init == "minmax" else MSE_RATIOS
    candidates = [(amax * ratio / fmt.max).clamp_min(MIN_SCALE) for ratio in ratios]
    errors = torch.stack([(round_to_format(rows / s[:, None], fmt) * s[:, None] - rows).square().sum(1)
                          for s in candidates])  # [candidates, rows]
    best = errors.argmin(0) if granularity == "channel" else \
        torch.tensor([first_minimum(list(errors[:, 0]))], device=rows.device)
    columns = torch.arange(len(amax), device=rows.device)
    return torch.stack(candidates)[best, columns], errors[best, columns]


class FloatFormatQuantizer(Quantizer):
    """``x̂ = s·round_to_format(x/s)`` with one calibrated scale per tensor or per output channel."""

    param_names = ("scale",)
    fmt: ClassVar[FloatFormat]
    #: the format fixes the bit-width: an override to this kind does not carry the old spec's bits over
    fixed_bits: ClassVar[bool] = True

    def __init__(self, bits: int | None = None, granularity: str = "tensor", init: str = "minmax") -> None:
        self._check_granularity(granularity)
        if init not in ("minmax", "mse"):
            raise VitqError(f"init of {self.kind!r} must be 'minmax' or 'mse', got {init!r}")
        super().__init__(_check_bits(self.kind, bits, self.fmt), granularity=granularity, init=init)
        self.granularity, self.init = granularity, init

    @classmethod
    def _check_granularity(cls, granularity: str) -> None:
        if granularity not in ("tensor", "channel"):
            raise VitqError(f"granularity of {cls.kind!r} must be 'tensor' or 'channel', got {granularity!r}")

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1) if self.granularity == "tensor" else x.reshape(x.shape[0], -1)

    def _broadcast(self, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scale.reshape(()) if self.granularity == "tensor" else scale.reshape(-1, *[1] * (x.ndim - 1))

    def calibrate(self, x: torch.Tensor) -> None:
        self.scale = scale_search(self._rows(x.detach().float()), self.fmt, self.init, self.granularity)[0]

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._broadcast(self.scale, x)
        return round_to_format(x / scale, self.fmt).mul_(scale).to(x.dtype)


@register_quantizer("fp")
class FloatSearchQuantizer(FloatFormatQuantizer):
    """A ``bits``-bit float format whose exponent/mantissa split is searched per tensor (LLM-FP4), each candidate
    with its MSE-searched scale. ``exponent_candidates``: the exponent bits tried (default: 1 to ``bits − 1``);
    buffers: ``scale`` and the chosen ``exponent_bits`` (0-d)."""

    param_names = ("scale", "exponent_bits")
    fixed_bits = False

    def __init__(self, bits: int, granularity: str = "tensor", exponent_candidates: list[int] | None = None) -> None:
        candidates = list(range(1, bits)) if exponent_candidates is None else exponent_candidates
        if not candidates:
            raise VitqError("the fp quantizer needs at least one of exponent_candidates")
        for e in candidates:
            if isinstance(e, bool) or not isinstance(e, int):
                raise VitqError(f"exponent_candidates must be integers, got {e!r}")
            searched_format(bits, e)  # checks the range
        self._check_granularity(granularity)
        Quantizer.__init__(self, bits, granularity=granularity, exponent_candidates=exponent_candidates)
        self.granularity, self.init, self.candidates = granularity, "mse", tuple(candidates)

    @property
    def fmt(self) -> FloatFormat:  # the calibrated format
        return searched_format(self.bits, int(self.exponent_bits))

    def calibrate(self, x: torch.Tensor) -> None:
        rows = self._rows(x.detach().float())
        best = None
        for e in self.candidates:  # the first format on ties
            scale, errors = scale_search(rows, searched_format(self.bits, e), "mse", self.granularity)
            total = float(errors.sum())
            if best is None or total < best[0]:
                best = (total, e, scale)
        self.scale, self.exponent_bits = best[2], torch.tensor(best[1], device=rows.device)

    def extra_repr(self) -> str:
        chosen = f", format={self.fmt.name}" if self.is_calibrated else ""
        return super().extra_repr() + chosen


@register_quantizer("fp8_e4m3")
class FP8E4M3Quantizer(FloatFormatQuantizer):
    fmt = E4M3


@register_quantizer("fp8_e5m2")
class FP8E5M2Quantizer(FloatFormatQuantizer):
    fmt = E5M2


@register_quantizer("fp4_e2m1")
class FP4E2M1Quantizer(FloatFormatQuantizer):
    fmt = E2M1


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` as [..., blocks, block] along its last dimension, zero-padded to a multiple of ``block``."""
    pad = -x.shape[-1] % block
    return F.pad(x, (0, pad)).unflatten(-1, (-1, block))


def _unblocks(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return blocks.flatten(-2)[..., :like.shape[-1]].to(like.dtype)


class _BlockQuantizer(Quantizer):
    """Shared block layout of the MX and NVFP4 kinds; elements in ``fmt``, ``block`` elements per scale."""

    fmt: ClassVar[FloatFormat]
    block: ClassVar[int]
    fixed_bits: ClassVar[bool] = True

    def __init__(self, bits: int | None = None) -> None:
        super().__init__(_check_bits(self.kind, bits, self.fmt))

    def block_scales(self, blocks: torch.Tensor) -> torch.Tensor:
        """The scale of each block of ``blocks`` ([..., blocks, 1])."""
        raise NotImplementedError

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        blocks = _blocks(x.float(), self.block)
        scale = self.block_scales(blocks)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block stays zero
        return _unblocks(round_to_format(blocks / safe, self.fmt).mul_(scale), x)


class MXQuantizer(_BlockQuantizer):
    """OCP MX: a power-of-two (E8M0) scale per block of 32, from the block itself."""

    block = 32

    def calibrate(self, x: torch.Tensor) -> None:
        """Nothing to calibrate: the block scales are computed from the tensor being quantized."""

    def block_scales(self, blocks: torch.Tensor) -> torch.Tensor:
        amax = blocks.abs().amax(-1, keepdim=True)
        exponent = amax.clamp_min(torch.finfo(amax.dtype).tiny).log2().floor_() - self.fmt.max_exponent
        return torch.where(amax > 0, exponent.clamp_(-127, 127).exp2_(), torch.zeros_like(amax))


@register_quantizer("mxfp8")
class MXFP8Quantizer(MXQuantizer):
    fmt = E4M3


@register_quantizer("mxfp4")
class MXFP4Quantizer(MXQuantizer):
    fmt = E2M1


@register_quantizer("nvfp4")
class NVFP4Quantizer(_BlockQuantizer):
    """NVFP4: E2M1 elements, an E4M3 scale per block of 16, one calibrated float32 scale per tensor."""

    param_names = ("global_scale",)
    fmt, block = E2M1, 16

    def calibrate(self, x: torch.Tensor) -> None:
        amax = x.detach().float().abs().amax().reshape(1)
        self.global_scale = (amax / (E4M3.max * E2M1.max)).clamp_min(MIN_SCALE)

    def block_scales(self, blocks: torch.Tensor) -> torch.Tensor:
        g = self.global_scale.reshape(())
        return round_to_format(blocks.abs().amax(-1, keepdim=True) / (E2M1.max * g), E4M3) * g


__all__ = ["E2M1", "E4M3", "E5M2", "FP4E2M1Quantizer", "FP8E4M3Quantizer", "FP8E5M2Quantizer", "FloatFormat",
           "FloatFormatQuantizer", "MXFP4Quantizer", "MXFP8Quantizer", "MXQuantizer", "NVFP4Quantizer",
           "round_to_format"]
