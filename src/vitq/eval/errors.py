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

from vitq.device import model_device
from vitq.quantized_model import QuantizedModel


@dataclass(frozen=True)
class PointError:
    point: str
    sqnr_db: float


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """SQNR of ``approx`` against ``reference`` in dB (``inf`` when they are equal)."""
    signal, noise = _energies(reference, approx).tolist()
    return _decibels(signal, noise)


def _energies(reference: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """``[Σ reference², Σ (reference − approx)²]`` in float64, on the tensors' device."""
    reference = reference.double()
    return torch.stack([reference.pow(2).sum(), (reference - approx.double()).pow(2).sum()])


def _decibels(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


@torch.no_grad()
def point_sqnr(qmodel: QuantizedModel, images: torch.Tensor) -> list[PointError]:
    """Accumulated SQNR at the output of every quantization point that quantizes something, in run order, on
    ``images`` moved to the model's device. The energies stay there until one transfer at the end."""
    images = images.to(model_device(qmodel))
    points = {name: point for name, point in qmodel.points().items()
              if any(getattr(point, attr) is not None for attr in point.slots())}
    outputs: dict[str, torch.Tensor] = {}
    energies: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, _inputs, output):
            outputs[name] = output.detach().clone()
        return hook

    def compare(name):
        def hook(_module, _inputs, output):
            energies[name] = _energies(outputs[name], output)
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
    if not energies:
        return []
    values = torch.stack(list(energies.values())).tolist()
    return [PointError(name, _decibels(signal, noise)) for name, (signal, noise) in zip(energies, values, strict=True)]
