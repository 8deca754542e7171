"""``adaround``: AdaRound (Nagel et al., ICML 2020) layer-wise rounding on the ``repq-vit`` calibration.

The model is calibrated exactly as ``repq-vit``, then every Linear/conv weight layer, in forward order, learns
whether each weight rounds up or down (rectified-sigmoid soft rounding with an annealed regulariser,
:mod:`vitq.calib.learnable`) so that the layer's output on its quantized input matches the float layer's output
(:func:`vitq.calib.recon.reconstruct_layers`). Activation steps stay as calibrated. This is the layer-wise
baseline of ``brecq`` (block units, activation steps learned too). Settings: ``--recon KEY=VALUE``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vitq.methods.base import Paper, register_method
from vitq.methods.brecq import BRECQ


@register_method("adaround")
class AdaRound(BRECQ):
    paper = Paper("Up or Down? Adaptive Rounding for Post-Training Quantization", "Nagel et al.", "ICML", 2020)
    summary = "layer-wise learned rounding of each weight layer against its float output"
    recon_defaults: ClassVar[dict[str, Any]] = {"unit": "layer", "learn_steps": False}
