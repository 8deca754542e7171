"""FQ-ViT's Power-of-Two Factor (PTF) quantizer for LayerNorm inputs (Lin et al., IJCAI 2022;
docs/protocol.md#other-baselines).

LayerNorm inputs (the residual stream) have a few channels with ranges tens of times wider than the rest, so
one per-tensor step is too coarse for most channels, while free per-channel steps would break the integer
LayerNorm (its mean and variance sum over channels). PTF gives channel ``c`` the step ``2^α_c · s`` with one
shared step ``s`` and one shared zero point ``z``: an integer LayerNorm aligns the channels with bit shifts.

    s_K = (max(x) − min(x)) / (q_max − q_min)        the per-tensor (min-max) step
    z   = q_min − round(min(x) / s_K)                 shared by every channel
    s   = s_K / 2^K,   α_c = argmin_{α ∈ 0..K} ‖x_c − Q(x_c; 2^α·s, z)‖²

(``K = max_factor``, 3 in FQ-ViT: steps ``s, 2s, 4s, 8s``). Stored as an ordinary per-channel uniform
quantizer along the last axis (scale ``2^α_c·s``, zero point ``z`` in every channel), so fake-quant, codes and
checkpoints are those of :class:`~vitq.quantizers.uniform.UniformQuantizer`.
"""

from __future__ import annotations

import torch

from vitq.errors import VitqError
from vitq.quantizers.registry import register_quantizer
from vitq.quantizers.uniform import MIN_SCALE, UniformQuantizer, fake_quant


@register_quantizer("ptf")
class PowerOfTwoFactorQuantizer(UniformQuantizer):
    """Per-channel (last axis) steps ``2^α_c·s``, ``α_c ∈ {0..max_factor}``, one zero point."""

    def __init__(self, bits: int, max_factor: int = 3, signed: bool = False) -> None:
        if isinstance(max_factor, bool) or not isinstance(max_factor, int) or not 0 <= max_factor <= 8:
            raise VitqError(f"max_factor must be an integer from 0 to 8, got {max_factor!r}")
        super().__init__(bits, signed=signed, granularity="channel", axis=-1, init="minmax")
        self._spec_kwargs = {"max_factor": max_factor, "signed": signed}
        self.max_factor = max_factor

    def calibrate(self, x: torch.Tensor) -> None:
        rows = self.group_rows(x.detach().float())  # [channels, elements]
        low, high = rows.min(), rows.max()
        full_step = ((high - low) / (self.q_max - self.q_min)).clamp_min(MIN_SCALE)
        zero_point = (self.q_min - torch.round(low / full_step)).clamp(self.q_min, self.q_max)
        base = full_step / 2**self.max_factor
        errors = torch.stack([
            (fake_quant(rows, base * 2**alpha, zero_point, self.q_min, self.q_max) - rows).square().sum(dim=1)
            for alpha in range(self.max_factor + 1)])  # [factors, channels]
        alpha = errors.argmin(dim=0)  # the smallest step on ties
        self.scale = base * torch.pow(2.0, alpha.float())
        self.zero_point = zero_point.expand_as(self.scale).clone()

