"""``is-vit``: I&S-ViT (Zhong et al., TPAMI 2025; NOTES §2.7), with block reconstruction.

Structure: the papers' convention (per-row asymmetric weights, per-tensor asymmetric activations, 8-bit image)
with the **shift-uniform-log2** quantizer (SULQ, :mod:`vitq.quantizers.sulq`) on the attention map, weight
ranges by the wider percentile search (:data:`~vitq.quantizers.ranges.WEIGHT_PERCENTILES`).

Calibration is I&S-ViT's **smooth optimization strategy** in three stages:

1. activations only: the weights stay float and the post-LayerNorm inputs (qkv, fc1) are quantized *per
   channel*; every activation quantizer is initialised on the first :data:`INIT_IMAGES` calibration images in
   forward order, then every block is reconstructed on all of them with activation steps only (the loss
   landscape of per-channel activations and float weights is smooth);
2. RepQ-ViT's reparameterization of the learned per-channel steps into the LayerNorm and the next Linear (target
   ``mean(s)``, ``mean(z)``), leaving per-tensor quantizers;
3. weight quantizers on, initialised on the (folded) weights; then the method's reconstruction
   (:meth:`~vitq.methods.base.Method.reconstruction`, run by :func:`vitq.quantize` after this) learns the weight
   rounding and the activation steps together.

Both reconstructions use the same :class:`~vitq.config.ReconConfig` (``--recon KEY=VALUE``; the paper: 1000
iterations per block (W3/W4), batch 64, 1024 images).
"""

from __future__ import annotations

from typing import Any

import torch

from vitq.calib.recon import reconstruct_model
from vitq.calib.reparam import fold_channel_scales, per_channel_twin, recalibrate_weight
from vitq.calib.runner import calibrate_in_forward_order
from vitq.methods.base import register_method
from vitq.methods.repq_vit import RepQViT
from vitq.quantizers import UniformQuantizer
from vitq.quantizers.ranges import WEIGHT_PERCENTILES

#: stage 1 initialises the activation quantizers on this many calibration images (the code's 64)
INIT_IMAGES = 64


@register_method("is-vit")
class ISViT(RepQViT):
    reconstructs = True

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        if role == "softmax":
            return {"kind": "sulq", "bits": self.config.a_bits}
        spec = super().quantizer_spec(role)
        if role == "weight":
            spec["search_percentiles"] = list(WEIGHT_PERCENTILES)
        return spec

    def calibrate(self, qmodel, images: torch.Tensor, *, progress: bool = True) -> None:
        pairs = [(qmodel.model.get_submodule(norm), qmodel.model.get_submodule(linear))
                 for norm, linear in qmodel.norm_linear_pairs()]
        pairs = [(norm, linear) for norm, linear in pairs if isinstance(linear.input_quantizer, UniformQuantizer)]
        weights = [slot.quantizer for slot in qmodel.slots() if slot.role == "weight" and slot.quantizer is not None]

        # stage 1: per-channel post-LayerNorm inputs, float weights; initialise, reconstruct activation steps
        per_tensor = {}
        for _, linear in pairs:
            per_tensor[linear] = linear.input_quantizer
            linear.input_quantizer = per_channel_twin(linear.input_quantizer)
        enabled = [q.enabled for q in weights]
        for q in weights:
            q.enabled = False
        calibrate_in_forward_order(qmodel, images[:INIT_IMAGES], progress=progress)
        settings = self.reconstruction()
        reconstruct_model(qmodel, images, settings.model_copy(update={"learn_rounding": False}),
                          seed=self.config.seed, progress=progress)
        for q, on in zip(weights, enabled, strict=True):
            q.enabled = on

        # stage 2: fold the learned per-channel steps; per-tensor quantizers with the target (s̃, z̃)
        for norm, linear in pairs:
            channel = linear.input_quantizer
            folded = fold_channel_scales(norm, linear, channel.scale, channel.zero_point, target="mean",
                                         code_range=(channel.q_min, channel.q_max))
            per_tensor[linear].set_params(folded.target_params(channel.scale.dtype))
            linear.input_quantizer = per_tensor[linear]

        # stage 3: weights on, initialised on the folded weights (the final reconstruction follows)
        for point in qmodel.points().values():
            if hasattr(point, "weight_quantizer"):
                recalibrate_weight(point)
