"""Per-point quantization error: how far each quantization point's output has drifted from float.

For every point (``blocks.3.mlp.fc2``, ...) the output of the quantized model is compared with the
output of the same model run in float on the same images, as a signal-to-quantization-noise ratio

    SQNR = 10·log10( Σ y_float² / Σ (y_float − y_quant)² )   [dB]

The error is *accumulated*: it includes everything quantized upstream, which is what decides the
final accuracy. Higher is better; each bit adds about 6 dB to a single uniform quantizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitq.quantized_model import QuantizedModel


@dataclass(frozen=True)
class PointError:
    point: str
    sqnr_db: float


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """SQNR of ``approx`` against ``reference`` in dB (``inf`` when they are equal)."""
    signal = reference.double().pow(2).sum().item()
    noise = (reference.double() - approx.double()).pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


@torch.no_grad()
def point_sqnr(qmodel: QuantizedModel, images: torch.Tensor) -> list[PointError]:
    """Accumulated SQNR at the output of every quantization point that quantizes something, in run order."""
    points = {name: point for name, point in qmodel.points().items()
              if any(getattr(point, attr) is not None for attr in point.slots())}
    outputs: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}

    def record(name):
        def hook(_module, _inputs, output):
            outputs[name] = output.detach().clone()
        return hook

    def compare(name):
        def hook(_module, _inputs, output):
            errors[name] = sqnr_db(outputs[name], output)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in points.items()]
    with qmodel.quantization_disabled():
        qmodel(images)
    for handle in handles:
        handle.remove()
    handles = [m.register_forward_hook(compare(n)) for n, m in points.items()]
    try:
        qmodel(images)
    finally:
        for handle in handles:
            handle.remove()
    return [PointError(name, db) for name, db in errors.items()]
