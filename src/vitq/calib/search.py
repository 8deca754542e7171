"""Method-agnostic parameter search driven by a downstream error.

A quantizer offers candidate parameter sets (:meth:`vitq.quantizers.Quantizer.search_candidates`);
:func:`search_by_output_error` installs each in turn and keeps the one whose fake-quant input gives the
consumer output closest to the float reference, e.g. for the attention map ``A`` the consumer
``lambda a: a @ v`` and the error ‖A·V − Q(A)·V‖² (AdaLog / docs/methods/dopq-vit.md,
docs/protocol.md#softmax-quantizers-alone).
:func:`attention_output_mse` is the matching relative error, for per-layer reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer, first_minimum

Consumer = Callable[..., torch.Tensor]


def _chunks(n: int, chunk: int | None) -> Iterator[slice]:
    if chunk is None:
        yield slice(None)
        return
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


@torch.no_grad()
def search_by_output_error(
    quantizer: Quantizer,
    x: torch.Tensor,
    consumer: Consumer,
    reference: torch.Tensor | None = None,
    *,
    chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """Install and return the candidate of ``quantizer.search_candidates(x)`` with the smallest
    ‖consumer(x_ref) − consumer(Q(x))‖² (sum of squared error, accumulated in float64).

    - ``reference``: the float consumer output (default ``consumer(x)``, computed once).
    - ``chunk=None``: ``consumer(a)`` is called on the whole (fake-quantized) ``x``.
      ``chunk=k``: ``x`` is processed in slices of ``k`` along dim 0 to bound memory, and the consumer is
      called as ``consumer(a_chunk, s)`` with ``s`` the ``slice`` of dim 0, so it can slice its other
      operands (``lambda a, s: a @ v[s]``); a given ``reference`` is sliced along dim 0 likewise.
    - Candidates are evaluated one at a time; ties keep the first candidate in the quantizer's order.
    - No candidates (a kind with nothing to search): falls back to ``quantizer.calibrate(x)``.
    """
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise VitqError(f"chunk must be a positive integer or None, got {chunk!r}")
    candidates = quantizer.search_candidates(x)
    if not candidates:
        quantizer.calibrate(x)
        return quantizer.get_params()
    n = x.shape[0] if x.ndim else 1
    slices = list(_chunks(n, chunk))

    def run(a: torch.Tensor, s: slice) -> torch.Tensor:
        return consumer(a) if chunk is None else consumer(a, s)

    def part(t: torch.Tensor, s: slice) -> torch.Tensor:
        return t if chunk is None else t[s]

    # Slices outer, candidates inner: each reference is computed once and each slice's quantizer-side work
    # can be shared between candidates (``fake_quant_candidates``, e.g. TanQ's per-clip part). Every
    # candidate's error is still the float64 sum over the slices in slice order.
    # the errors stay float64 scalars on the device (no transfer per candidate and slice); the same float64
    # additions in the same order as Python floats would do, then one transfer to pick the best
    errors: list[torch.Tensor | float] = [0.0] * len(candidates)
    scratch = _Scratch()
    for s in slices:
        xs = part(x, s)
        ref = run(xs, s) if reference is None else part(reference, s)
        count = 0
        for i, q in enumerate(quantizer.fake_quant_candidates(xs, candidates)):
            errors[i] = scratch.squared_error(run(q, s), ref) + errors[i]
            count += 1
        if count != len(candidates):
            raise VitqError(f"{type(quantizer).__name__}.fake_quant_candidates gave {count} outputs "
                            f"for {len(candidates)} candidates")

    quantizer.set_params(candidates[first_minimum(errors)])  # ties keep the first candidate
    return quantizer.get_params()


class _Scratch:
    """``(out − ref).double().square().sum()`` (a float64 scalar on the device) with the float64 difference
    written into a reused buffer (one allocation per shape instead of three per call); same values, same
    summation."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def squared_error(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if (out.dtype != torch.float32 or ref.dtype != torch.float32 or out.shape != ref.shape
                or not (out.is_contiguous() and ref.is_contiguous())):  # keep the reference layout's sum order
            return (out - ref).double().square().sum()
        buf = self.buffer
        if buf is None or buf.shape != out.shape or buf.device != out.device:
            buf = self.buffer = torch.empty(out.shape, dtype=torch.float64, device=out.device)
        # the float32 difference, cast to float64 on write (as ``(out - ref).double()``)
        return torch.sub(out, ref, out=buf).square_().sum()


@torch.no_grad()
def attention_output_mse(quantizer: Quantizer, attn: torch.Tensor, v: torch.Tensor) -> float:
    """Relative attention-output error ‖A·V − Q(A)·V‖² / ‖A·V‖² of a calibrated quantizer
    (0 when both are 0, inf when only the reference is 0)."""
    ref = attn @ v
    num, den = torch.stack([(quantizer.quantize_dequantize(attn) @ v - ref).double().square().sum(),
                            ref.double().square().sum()]).tolist()  # one transfer for both
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


@contextmanager
def attention_output_calibration(attention_modules: Iterable[nn.Module], *, chunk: int = 8) -> Iterator[None]:
    """During forward-order calibration, choose each softmax quantizer by its attention-output error.

    For every attention module (with ``v`` and ``softmax`` quantization points, see
    :mod:`vitq.nn.attention`), the quantized values ``Q(v)`` are captured as the module computes them
    (``v`` is quantized before the attention map) and the softmax quantizer's parameters are searched
    by ‖A·Q(v) − Q(A)·Q(v)‖², the error its real consumer sees, instead of ‖A − Q(A)‖². ``A`` and ``Q(A)`` go
    through the module's ``value_weights`` first (the identity, or talking heads' ``proj_w`` head mix).
    """
    hooks, touched = [], []
    for module in attention_modules:
        quantizer = module.softmax.quantizer
        if quantizer is None:
            continue
        captured: dict[str, torch.Tensor] = {}

        def keep_v(_module, _inputs, output, captured=captured):
            captured["v"] = output.detach()

        def calibrate(attn, quantizer=quantizer, captured=captured, weights=module.value_weights):
            v = captured["v"]
            search_by_output_error(quantizer, attn, lambda a, s: weights(a) @ v[s], chunk=chunk)

        hooks.append(module.v.register_forward_hook(keep_v))
        quantizer.calibrator = calibrate
        touched.append(quantizer)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for quantizer in touched:
            quantizer.calibrator = None


@contextmanager
def linear_output_calibration(slots: Iterable, *, row_stride: int = 1) -> Iterator[None]:
    """During forward-order calibration, choose each listed Linear *input* quantizer by that Linear's output
    error ‖x·Wᵀ − Q(x)·Wᵀ‖² (the bias cancels) over its :meth:`~vitq.quantizers.Quantizer.search_candidates`.

    ``slots``: :class:`~vitq.quantized_model.Slot` s whose module is a ``QLinear`` and attribute its
    ``input_quantizer`` (e.g. the post-GELU inputs of fc2: NoisyQuant, AdaLog). ``row_stride``: search on every
    ``row_stride``-th token only, to bound the cost of many candidates.
    """
    if isinstance(row_stride, bool) or not isinstance(row_stride, int) or row_stride < 1:
        raise VitqError(f"row_stride must be a positive integer, got {row_stride!r}")
    touched = []
    for slot in slots:
        quantizer = slot.quantizer
        if quantizer is None:
            continue

        def by_output(x, quantizer=quantizer, weight=slot.module.weight):
            rows = x.reshape(-1, x.shape[-1])[::row_stride]
            search_by_output_error(quantizer, rows, lambda a: F.linear(a, weight))

        quantizer.calibrator = by_output
        touched.append(quantizer)
    try:
        yield
    finally:
        for quantizer in touched:
            quantizer.calibrator = None
