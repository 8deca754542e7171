"""``qdrop``: QDrop (Wei et al., ICLR 2022) block reconstruction on the ``repq-vit`` calibration.

As ``brecq``, with QDrop's change: while a block is reconstructed, every activation keeps its float value with
probability ``drop_prob = 0.5`` instead of being quantized (a fresh random mask per step), which flattens the
loss landscape the learned rounding and steps are fitted on. ``--recon drop_prob=P`` changes it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vitq.methods.base import Paper, register_method
from vitq.methods.brecq import BRECQ


@register_method("qdrop")
class QDrop(BRECQ):
    paper = Paper("QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization",
                  "Wei et al.", "ICLR", 2022)
    summary = "block reconstruction with each activation kept float with probability 0.5"
    recon_defaults: ClassVar[dict[str, Any]] = {"drop_prob": 0.5}
