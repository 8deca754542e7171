"""4-bit weights in the file: the Linear layers whose weights have at most 4 bits become onnxruntime's
``MatMulNBits``.

``MatMulNBits`` (domain ``com.microsoft``) computes ``Y = A · dequant(B)ᵀ`` for a float input ``A`` [..., K] and a
weight ``B`` [N, K] stored block-wise along K: blocks of ``block_size`` consecutive inputs (a power of two, at
least 16), each with one float scale and one zero point, ``dequant = (code − zero) · scale``. The codes are
packed two per byte, the first in the low nibble (``B`` is [N, blocks, block_size / 2] uint8), the zero points
likewise, row by row ([N · ⌈blocks / 2⌉] uint8).

Our weight quantizers map onto it exactly. A uniform quantizer's codes ``q ∈ [q_min, q_max]`` dequantize to
``(q − z)·Δ``; the file stores ``q − q_min`` (in ``[0, 15]`` for 2 to 4 bits) and the zero point ``z − q_min``
(an integer in ``[0, 15]``), whose difference is the same ``q − z``. A per-output-channel (or per-tensor) step
repeats in every block of its row; a per-group step (GPTQ's group size, a power of two ≥ 16) is one block.

``accuracy_level`` is how onnxruntime computes the product: 0 (unset) or 1 in float32, so the result is the
fake-quant model's up to float summation order; 4 quantizes ``A`` to int8 on the fly (per block, symmetric) and
runs integer kernels: faster, and then ``A`` is rounded once more (for a W4A8 model whose input is already on an
8-bit grid, by less than half its step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vitq.export.packing import pack_codes
from vitq.nn import QLinear
from vitq.quantizers import Quantizer
from vitq.quantizers.uniform import UniformQuantizer

OP, DOMAIN = "MatMulNBits", "com.microsoft"
#: the bits every code is stored at (2- and 3-bit codes are a sub-range)
STORAGE_BITS = 4
MIN_BLOCK, MAX_BLOCK = 16, 128
#: onnxruntime's compute types: float32, or int8 with ``A`` quantized per block at run time
ACCURACY_LEVELS = {"fp32": 1, "int8": 4}
FORM = "4-bit weight (MatMulNBits)"


@dataclass(frozen=True)
class NBitsWeight:
    """A weight in ``MatMulNBits`` storage (see the module notes)."""

    packed: np.ndarray  # uint8 [N, blocks, block_size / 2]
    scales: np.ndarray  # float32 [N · blocks]
    zero_points: np.ndarray  # uint8 [N · ⌈blocks / 2⌉]
    block_size: int
    in_features: int
    out_features: int


def _channel_block(in_features: int) -> int:
    """The block of a per-channel weight: the largest power of two in [16, 128] that divides K (else 32, and the
    last block is padded)."""
    for block in (128, 64, 32, 16):
        if in_features % block == 0:
            return block
    return 32


def nbits_problem(quantizer: Quantizer | None) -> str | None:
    """Why the weight quantizer ``quantizer`` has no ``MatMulNBits`` form, or ``None`` when it has one."""
    if getattr(quantizer, "kind", None) != UniformQuantizer.kind:
        return "not a uniform quantizer"
    if quantizer.q_max - quantizer.q_min >= 2**STORAGE_BITS:
        return f"{quantizer.bits}-bit codes (4 at most)"
    granularity = quantizer.granularity
    if granularity == "group":
        size = quantizer.group_size
        if size < MIN_BLOCK or size & (size - 1):
            return f"group size {size} (MatMulNBits blocks are powers of two >= {MIN_BLOCK})"
    elif granularity not in ("tensor", "channel") or (granularity == "channel" and quantizer.axis != 0):
        return f"per-{granularity} steps (per tensor, output channel or group only)"
    zero_point = quantizer.zero_point.detach()
    if not bool((zero_point == zero_point.round()).all()):
        return "fractional zero point"
    stored = zero_point - quantizer.q_min
    if float(stored.min()) < 0 or float(stored.max()) >= 2**STORAGE_BITS:
        return f"zero points outside the {STORAGE_BITS}-bit storage range"
    return None


def nbits_weight(quantizer: UniformQuantizer, weight: torch.Tensor) -> NBitsWeight:
    """``weight`` [N, K] quantized by ``quantizer`` (which has a form: :func:`nbits_problem` is ``None``), in
    ``MatMulNBits`` storage."""
    weight = weight.detach()
    n, k = weight.shape
    codes = quantizer.int_repr(weight) - quantizer.q_min  # [N, K] in [0, 15]
    per_element_zero = quantizer.broadcast(quantizer.zero_point.detach(), weight) - quantizer.q_min
    per_element_scale = quantizer.broadcast(quantizer.scale.detach(), weight).expand(n, k)
    block = quantizer.group_size if quantizer.granularity == "group" else _channel_block(k)
    blocks = -(-k // block)
    pad = blocks * block - k
    if pad:  # padded codes equal their zero point: they dequantize to 0
        codes = torch.cat([codes, per_element_zero.expand(n, k)[:, -1:].expand(n, pad).to(codes.dtype)], dim=1)
    # one step and zero point per block: the first element's (all of a block's elements share them)
    block_starts = torch.arange(0, k, block)
    scales = per_element_scale[:, block_starts].float()
    zeros = per_element_zero.expand(n, k)[:, block_starts].round().to(torch.int64)
    packed = pack_codes(codes.reshape(n, blocks, block), STORAGE_BITS).reshape(n, blocks, block * STORAGE_BITS // 8)
    zero_rows = torch.cat([zeros, zeros.new_zeros(n, blocks % 2)], dim=1)  # each row packs to whole bytes
    return NBitsWeight(packed=packed.numpy(), scales=scales.reshape(-1).numpy(),
                       zero_points=pack_codes(zero_rows, STORAGE_BITS).numpy(), block_size=block, in_features=k,
                       out_features=n)


def _constant(g, array: np.ndarray):
    return g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(array)))


class _MatMulNBits(torch.autograd.Function):
    """``F.linear`` with the fake-quant weight in torch; ``MatMulNBits`` (then ``Add`` of the bias) in ONNX."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dequantized: torch.Tensor, bias: torch.Tensor | None, stored: NBitsWeight,
                accuracy_level: int) -> torch.Tensor:
        return F.linear(x, dequantized, bias)

    @staticmethod
    def symbolic(g, x, dequantized, bias, stored: NBitsWeight, accuracy_level: int):
        y = g.op(f"{DOMAIN}::{OP}", x, _constant(g, stored.packed), _constant(g, stored.scales),
                 _constant(g, stored.zero_points), K_i=stored.in_features, N_i=stored.out_features,
                 bits_i=STORAGE_BITS, block_size_i=stored.block_size, accuracy_level_i=accuracy_level)
        return y if bias is None else g.op("Add", y, bias)


@contextmanager
def nbits_linears(qmodel, accuracy_level: int, *, enabled: bool = True) -> Iterator[list[str]]:
    """While inside (and ``enabled``), every :class:`~vitq.nn.QLinear` of ``qmodel`` whose weight quantizer has a
    ``MatMulNBits`` form computes through :class:`_MatMulNBits` (the ONNX export then writes that op). Yields the
    names of those weight slots."""
    patched = []
    for slot in qmodel.slots() if enabled else []:
        quantizer = slot.quantizer
        if slot.role != "weight" or not isinstance(slot.module, QLinear) or quantizer is None \
                or not quantizer.enabled or nbits_problem(quantizer) is not None:
            continue
        module = slot.module
        stored, dequantized = nbits_weight(quantizer, module.weight), quantizer(module.weight.detach())

        def forward(x, module=module, stored=stored, dequantized=dequantized):
            if module.input_quantizer is not None:
                x = module.input_quantizer(x)
            return _MatMulNBits.apply(x, dequantized, module.bias, stored, accuracy_level)

        module.forward = forward
        patched.append((slot.name, module))
    try:
        yield [name for name, _ in patched]
    finally:
        for _, module in patched:
            del module.forward


__all__ = ["ACCURACY_LEVELS", "FORM", "NBitsWeight", "nbits_linears", "nbits_problem", "nbits_weight"]
