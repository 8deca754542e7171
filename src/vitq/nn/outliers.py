"""Outlier splitting (the LLM.int8() idea): a Linear's few outlier input channels stay float, the rest is quantized.

With a 0/1 mask ``m`` over the K input channels (1 = outlier), a :class:`~vitq.nn.QLinear` computes the two-part
product

    y = Q_a(x ⊙ (1 − m)) · Q_w(W ⊙ (1 − m))ᵀ + (x ⊙ m) · (W ⊙ m)ᵀ + b

The outlier channels are zero in the quantized part, and a uniform grid with an integer zero point maps 0 to
exactly 0, so the first product holds no trace of them, and the second holds exactly them, in float. The
quantizers are calibrated on the masked tensors: the activation range no longer has to reach the outliers, which is
the point (post-LayerNorm inputs of ViTs have a few channels tens of times wider than the rest).

The mask is chosen on the calibration data, on the first batch the layer sees while its input quantizer
calibrates: the channels with the ``top_k`` largest ``max |x|``, or those above ``threshold`` (LLM.int8() uses
6.0). The cost: ``k`` of ``K`` input channels and ``k`` weight columns kept at 16-bit float
(:func:`extra_bits`).
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError

#: the precision outlier channels are counted at (float16, as LLM.int8())
OUTLIER_BITS = 16


class ChannelSplit(nn.Module):
    """The outlier mask of one Linear layer's input channels (a buffer ``mask``, saved with the model)."""

    def __init__(self, channels: int, top_k: int | None = None, threshold: float | None = None, *,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if (top_k is None) == (threshold is None):
            raise VitqError("outlier splitting needs exactly one of top_k and threshold")
        self.top_k, self.threshold = top_k, threshold
        self.register_buffer("mask", torch.zeros(channels, device=device))
        self.selected = False  # chosen on calibration data, or loaded

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> None:
        """Choose the outlier channels from ``x`` [..., K] (its last dimension)."""
        if x.device.type == "meta":  # a shapes-only trace (checking a saved model) chooses nothing
            return
        peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)
        mask = torch.zeros_like(self.mask)
        if self.top_k is not None:
            mask[peak.topk(min(self.top_k, peak.numel())).indices] = 1.0
        else:
            mask[peak > self.threshold] = 1.0
        self.mask.copy_(mask)
        self.selected = True

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.selected = True

    def extra_repr(self) -> str:
        rule = f"top_k={self.top_k}" if self.top_k is not None else f"threshold={self.threshold}"
        return f"{self.mask.numel()} channels, {rule}, {self.count} outliers"


def attach_outlier_splits(qmodel, top_k: int | None, threshold: float | None, roles: tuple[str, ...]) -> int:
    """Give every :class:`~vitq.nn.QLinear` of ``qmodel`` whose quantized input has one of ``roles`` a
    :class:`ChannelSplit`; returns how many."""
    count = 0
    for slot in qmodel.slots():  # a QLinear is the point with an ``outlier_split`` attribute
        if slot.attr == "input_quantizer" and hasattr(slot.module, "outlier_split") and slot.role in roles \
                and slot.quantizer is not None:
            slot.module.outlier_split = ChannelSplit(slot.module.in_features, top_k, threshold,
                                                     device=slot.module.weight.device)
            count += 1
    return count


def extra_bits(split: ChannelSplit, bits: int) -> float:
    """Mean extra bits per input element (or weight) that keeping the outliers at 16 bits costs over ``bits``."""
    return split.count * (OUTLIER_BITS - bits) / split.mask.numel()


__all__ = ["OUTLIER_BITS", "ChannelSplit", "attach_outlier_splits", "extra_bits"]
