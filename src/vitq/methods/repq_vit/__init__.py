"""``repq-vit``: RepQ-ViT (Li et al., ICCV 2023), calibration only, 32 images (docs/methods/repq-vit.md).

- Structure: the papers' convention (per-output-channel weights, per-tensor activations) with every
  uniform range chosen by the MSE percentile search, and the **log√2** quantizer on the post-Softmax
  attention map (its Δ searched over the {0.999, 0.9999, 0.99999} quantiles by ‖A − Q(A)‖²).
- Calibration, block by block in forward order: the post-LayerNorm inputs of ``qkv``/``fc1`` (Swin:
  ``reduction``) are calibrated per channel, then their scales are folded into the LayerNorm affine
  and the next Linear so that inference is per tensor with target ``(mean(s), mean(z))``, and the
  folded Linear's weight quantizer is re-calibrated (:mod:`vitq.methods.repq_vit.reparam`).
"""

from __future__ import annotations

from typing import Any

from vitq.methods.base import Method, Paper, register_method
from vitq.methods.repq_vit.reparam import reparameterize_model
from vitq.quantizers.ranges import REPQ_PERCENTILES


@register_method("repq-vit")
class RepQViT(Method):
    paper = Paper("RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision Transformers",
                  "Li et al.", "ICCV", 2023)
    summary = "per-channel post-LayerNorm scales folded into LayerNorm + next Linear; log√2 post-Softmax quantizer"
    init = "mse"
    #: the post-Softmax quantizer kind
    softmax_kind = "log_sqrt2"
    #: the percentiles each weight row's range is searched over (a subclass or an option may widen them)
    weight_percentiles: tuple[float, ...] = REPQ_PERCENTILES

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        if role == "softmax":
            return {"kind": self.softmax_kind, "bits": self.config.a_bits}
        spec = super().quantizer_spec(role)
        if role == "weight" and self.weight_percentiles != REPQ_PERCENTILES:
            spec["search_percentiles"] = list(self.weight_percentiles)
        return spec

    def calibrate(self, qmodel, images, *, progress: bool = True) -> None:
        reparameterize_model(qmodel, images, progress=progress, target="mean")
