"""I&S-ViT's smooth optimization strategy (SOS, docs/methods/is-vit.md): how a method reaches a fully quantized model
that block reconstruction can fine-tune, shared by ``is-vit`` and ``dopq-vit`` (option ``smooth``).

Reconstructing a fully quantized ViT at once starts from a rough loss landscape: per-tensor post-LayerNorm inputs
(whose channels differ by orders of magnitude) and quantized weights together. SOS gets there in steps:

1. the post-LayerNorm inputs (the uniform input quantizer of every ``norm_linear_pairs`` Linear) are quantized
   *per channel* and the weights stay float; the method initialises the activation quantizers (``initialise``),
   then every block is reconstructed with its activation steps only (a smooth landscape);
2. RepQ-ViT's reparameterization folds the *learned* per-channel steps into the LayerNorm and the Linear
   (target ``mean``, I&S-ViT, or ``median``, DopQ-ViT's MOSF), leaving per-tensor quantizers;
3. the weight quantizers come back on, calibrated on the folded weights. The final reconstruction of weights
   and activations together is the caller's (:func:`vitq.quantize` runs the method's
   :meth:`~vitq.methods.base.Method.reconstruction` after calibration).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vitq.calib.recon import reconstruct_model
from vitq.config import ReconConfig
from vitq.methods.repq_vit.reparam import Target, fold_channel_scales, per_channel_twin, recalibrate_weight
from vitq.quantizers import UniformQuantizer


def smooth_optimization(qmodel, images: torch.Tensor, settings: ReconConfig, initialise: Callable[[], None], *,
                        target: Target = "mean", seed: int = 0, progress: bool = True) -> None:
    """Stages 1-3 above on a freshly built ``qmodel``: ``initialise()`` must calibrate its enabled quantizers
    (the weights are disabled meanwhile), ``settings`` are the reconstruction's (stage 1 learns no rounding)."""
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
    try:
        initialise()
        reconstruct_model(qmodel, images, settings.model_copy(update={"learn_rounding": False}), seed=seed,
                          progress=progress)
    finally:
        for q, on in zip(weights, enabled, strict=True):
            q.enabled = on

    # stage 2: fold the learned per-channel steps; per-tensor quantizers with the target (s̃, z̃)
    for norm, linear in pairs:
        channel = linear.input_quantizer
        if channel.is_calibrated:  # a disabled (float) input saw nothing: nothing to fold
            folded = fold_channel_scales(norm, linear, channel.scale, channel.zero_point, target=target,
                                         code_range=(channel.q_min, channel.q_max))
            per_tensor[linear].set_params(folded.target_params(channel.scale.dtype))
        linear.input_quantizer = per_tensor[linear]

    # stage 3: weights on, initialised on the folded weights
    for point in qmodel.points().values():
        if hasattr(point, "weight_quantizer"):
            recalibrate_weight(point)
