"""``noisyquant``: NoisyQuant (Liu et al., CVPR 2023) on the ``percentile`` uniform baseline
(docs/protocol.md#other-baselines).

Every post-GELU activation (the input of ``fc2``) gets a fixed noisy bias before its per-tensor uniform
quantizer (:class:`vitq.quantizers.noisy.NoisyUniformQuantizer`), removed after it — the same as folding
``−W·N`` into ``fc2``'s bias. The noise width is chosen per layer among ``amplitudes`` (in units of the
noise-free step) by ``fc2``'s output error ‖x·Wᵀ − Q̃(x)·Wᵀ‖² on the calibration data, during the forward-order
calibration (the quantizer sees inputs already quantized upstream). Everything else is ``percentile``.

Option: ``amplitudes`` (default ``[0, 0.25, 0.5, 0.75, 1]``; 0 keeps plain uniform quantization available).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, FiniteFloat

from vitq.calib.runner import calibrate_in_forward_order
from vitq.calib.search import linear_output_calibration
from vitq.methods.base import MethodOptions, Paper, register_method
from vitq.methods.percentile import PercentileMethod
from vitq.quantizers.noisy import DEFAULT_AMPLITUDES


@register_method("noisyquant")
class NoisyQuant(PercentileMethod):
    paper = Paper("NoisyQuant: Noisy Bias-Enhanced Post-Training Activation Quantization for Vision Transformers",
                  "Liu et al.", "CVPR", 2023)
    summary = "a fixed noisy bias on every post-GELU activation, its width per layer by fc2's output error"
    extra_settings = ()  # its noisy bias is an activation technique: no weight-only settings
    splits_outliers = False  # its noise widths are fitted to fc2's unsplit inputs

    class Options(MethodOptions):
        amplitudes: list[FiniteFloat] = Field(list(DEFAULT_AMPLITUDES), min_length=1,
                                              description="noise widths tried per layer, in noise-free steps")

    options: Options

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        if role != "post_gelu":
            return super().quantizer_spec(role)
        amplitudes = list(self.options.amplitudes)
        return {"kind": "noisy_uniform", "bits": self.config.a_bits, "init": self.init, "amplitudes": amplitudes,
                "noise_seed": self.config.seed}

    def calibrate(self, qmodel, images, *, progress: bool = True) -> None:
        post_gelu = [slot for slot in qmodel.slots() if slot.role == "post_gelu"]
        with linear_output_calibration(post_gelu):
            calibrate_in_forward_order(qmodel, images, progress=progress)
