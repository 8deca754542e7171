"""``is-vit``: I&S-ViT (Zhong et al., TPAMI 2025; docs/methods/is-vit.md), with block reconstruction.

Structure: the papers' convention (per-row asymmetric weights, per-tensor asymmetric activations, 8-bit image)
with the **shift-uniform-log2** quantizer (SULQ, :mod:`vitq.quantizers.sulq`) on the attention map, weight
ranges by the wider percentile search (:data:`~vitq.quantizers.ranges.WEIGHT_PERCENTILES`).

Calibration is I&S-ViT's **smooth optimization strategy** (:mod:`vitq.methods.is_vit.smooth`) in three stages:

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

import torch

from vitq.calib.runner import calibrate_in_forward_order
from vitq.methods.base import Paper, register_method
from vitq.methods.is_vit.smooth import smooth_optimization
from vitq.methods.repq_vit import RepQViT
from vitq.quantizers.ranges import WEIGHT_PERCENTILES

#: stage 1 initialises the activation quantizers on this many calibration images (the code's 64)
INIT_IMAGES = 64


@register_method("is-vit")
class ISViT(RepQViT):
    round_to_nearest_twin = "repq-vit"
    paper = Paper("I&S-ViT: An Inclusive & Stable Method for Pushing the Limit of Post-Training ViTs Quantization",
                  "Zhong et al.", "TPAMI", 2025)
    summary = "shift-uniform-log2 softmax quantizer and three-stage smooth optimization with reconstruction"
    reconstructs = True
    softmax_kind = "sulq"
    weight_percentiles = WEIGHT_PERCENTILES

    def calibrate(self, qmodel, images: torch.Tensor, *, progress: bool = True) -> None:
        smooth_optimization(qmodel, images, self.reconstruction(),
                            lambda: calibrate_in_forward_order(qmodel, images[:INIT_IMAGES], progress=progress),
                            target="mean", seed=self.config.seed, progress=progress)
