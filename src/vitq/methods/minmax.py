"""``minmax``: uniform quantizers whose range is the observed min/max of the calibration data.

The simplest baseline: per-output-channel weights, per-tensor activations, each quantizer
calibrated on the whole calibration batch in forward order (the base method's calibration).
"""

from __future__ import annotations

from vitq.methods.base import Method, register_method


@register_method("minmax")
class MinMaxMethod(Method):
    summary = "uniform quantizers, min/max range, calibrated block by block in forward order"
    splits_outliers = True
    init = "minmax"
