"""Model size at the chosen bit widths.

Counted as a deployment would store it: each quantized weight at its bit width, plus one fp16
scale and one fp16 zero point per quantization group; every other parameter and buffer (biases,
LayerNorm, embeddings, float layers) at its own dtype size. The float size is the plain
``state_dict`` of the unquantized model.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitq.nn.outliers import OUTLIER_BITS
from vitq.quantized_model import QuantizedModel

FP16_BYTES = 2


@dataclass(frozen=True)
class SizeReport:
    float_bytes: int
    quantized_bytes: int

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / self.float_bytes

    def summary(self) -> str:
        mb = 1e6
        return (f"{self.quantized_bytes / mb:.2f} MB quantized vs {self.float_bytes / mb:.2f} MB float "
                f"({self.ratio:.3f}x)")


def model_size(qmodel: QuantizedModel) -> SizeReport:
    quantized_weights = {}
    for name, point in qmodel.points().items():
        quantizer = getattr(point, "weight_quantizer", None)
        if quantizer is not None:
            groups = max((getattr(quantizer, p).numel() for p in quantizer.param_names), default=1)
            bits = point.weight.numel() * quantizer.bits
            split = getattr(point, "outlier_split", None)
            if split is not None:  # the outlier columns are float16 instead
                bits += split.count * point.weight.shape[0] * (OUTLIER_BITS - quantizer.bits)
            quantized_weights[f"{name}.weight"] = (bits + 7) // 8 + 2 * FP16_BYTES * groups
    float_bytes = quantized_bytes = 0
    for key, tensor in qmodel.model.state_dict().items():
        if "_quantizer." in key or ".outlier_split." in key:
            continue  # quantizer parameters are counted with their weight (activation scales: negligible)
        plain = tensor.numel() * tensor.element_size()
        float_bytes += plain
        quantized_bytes += quantized_weights.get(key, plain)
    return SizeReport(float_bytes, quantized_bytes)
