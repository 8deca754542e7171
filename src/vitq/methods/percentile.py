"""``percentile``: uniform quantizers whose clipping range is chosen by RepQ-ViT's MSE search.

For every quantization group (a weight row, or a whole activation tensor) the candidate ranges
are the {0.999, 0.9999, 0.99999} percentiles; the one with the smallest ``||x - Q(x)||²`` wins
(docs/protocol.md#what-is-quantized). Same structure and forward-order calibration as ``minmax``: this is RepQ-ViT
without its reparameterization and log√2 softmax quantizer.
"""

from __future__ import annotations

from vitq.methods.base import DEPLOYMENT_SETTINGS, Method, register_method


@register_method("percentile")
class PercentileMethod(Method):
    summary = "uniform quantizers, range by an MSE search over high percentiles (RepQ-ViT's baseline)"
    splits_outliers = True
    init = "mse"
    extra_settings = DEPLOYMENT_SETTINGS  # round-to-nearest weights: the baseline of the weight-rounding methods
