"""Bit packing of integer codes: ``n`` codes of ``b`` bits take ``ceil(n·b / 8)`` bytes.

Layout (little-endian bit stream): code ``i`` occupies bits ``i·b … i·b + b − 1`` of the stream, least
significant bit first; bit ``k`` of the stream is bit ``k mod 8`` of byte ``k div 8``. So 4-bit codes put
code ``2j`` in the low nibble of byte ``j`` and 8-bit codes are the bytes themselves; 3-bit codes straddle
bytes. Codes must be in ``[0, 2^b)`` (store ``code − q_min`` for signed grids).
"""

from __future__ import annotations

import torch

from vitq.errors import VitqError

MAX_PACK_BITS = 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_PACK_BITS:
        raise VitqError(f"can only pack codes of 1..{MAX_PACK_BITS} bits, got {bits!r}")


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes (any shape, flattened in C order) packed into a 1-d ``uint8`` tensor."""
    _check_bits(bits)
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise VitqError(f"codes must be in [0, {2**bits}) to pack at {bits} bits, "
                        f"got [{int(flat.min())}, {int(flat.max())}]")
    shifts = torch.arange(bits, dtype=torch.int64, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # bit k of the stream
    stream = torch.cat([stream, stream.new_zeros(packed_size(flat.numel(), bits) * 8 - stream.numel())])
    weights = 1 << torch.arange(8, dtype=torch.int64, device=flat.device)
    return (stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of a stream made by :func:`pack_codes`, as ``int32``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise VitqError(f"packed codes must be a 1-d uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}")
    if packed.numel() != packed_size(count, bits):
        raise VitqError(f"{packed.numel()} bytes cannot hold exactly {count} codes of {bits} bits")
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, dtype=torch.int64, device=packed.device)) & 1)
    stream = stream.reshape(-1)
    bits_per_code = stream[:count * bits].reshape(count, bits)
    return (bits_per_code << torch.arange(bits, dtype=torch.int64, device=packed.device)).sum(dim=1).to(torch.int32)
