"""``fqvit``: FQ-ViT (Lin et al., IJCAI 2022), "fully quantized" ViT, calibration only
(docs/protocol.md#other-baselines).

FQ-ViT quantizes what other methods leave float, so that LayerNorm and Softmax can run in integers:

- **Power-of-Two Factor** on every LayerNorm *input* (the residual stream, role ``pre_ln``):
  :class:`~vitq.quantizers.ptf.PowerOfTwoFactorQuantizer` — per-channel steps ``2^α_c·s`` sharing one step and
  one zero point, ``α_c ∈ {0..3}`` chosen per channel by quantization MSE;
- **Log-Int-Softmax**: the attention map as 4-bit log2 codes with scale 1 (``x̂ = 2^−q``, q = 0..15, below
  ``2^−15.5`` → 0), so ``A·V`` becomes shifts (the ``log2`` quantizer with its scale fixed at 1);
- everything else as FQ-ViT's configuration: weights per output channel, signed and **symmetric**, min-max;
  activations per tensor, asymmetric, min-max, calibrated on the whole calibration batch in forward order.

Option ``softmax_bits`` (default ``min(4, a_bits)``): bits of the Log-Int-Softmax codes.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from vitq.methods.base import Method, MethodOptions, Paper, register_method
from vitq.quantizers.base import MAX_BITS, MIN_BITS


@register_method("fqvit")
class FQViT(Method):
    init = "minmax"

    paper = Paper("FQ-ViT: Post-Training Quantization for Fully Quantized Vision Transformer", "Lin et al.",
                  "IJCAI", 2022)
    summary = "Power-of-Two Factor LayerNorm inputs, Log-Int-Softmax: LayerNorm and Softmax in integers"

    class Options(MethodOptions):
        softmax_bits: int | None = Field(None, ge=MIN_BITS, le=MAX_BITS,
                                         description="bits of the Log-Int-Softmax codes (null: min(4, a_bits))")

    options: Options

    def __init__(self, config) -> None:
        super().__init__(config)
        self.softmax_bits = self.options.softmax_bits or min(4, config.a_bits)

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        cfg = self.config
        if role == "pre_ln":
            return {"kind": "ptf", "bits": cfg.a_bits}
        if role == "softmax":
            return {"kind": "log2", "bits": self.softmax_bits, "search_percentiles": [], "fixed_scales": [1.0]}
        if role == "weight":
            return {"kind": "uniform", "bits": cfg.w_bits, "granularity": "channel", "axis": 0, "init": "minmax",
                    "signed": True, "symmetric": True}
        return super().quantizer_spec(role)
