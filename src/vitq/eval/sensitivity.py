"""Per-point sensitivity: what quantizing one point costs when everything else stays float.

For every quantization point of a calibrated model (weights and activations apart), on a set of labelled images
(the calibration images: choosing precisions must not look at the evaluation images):

- ``kl``: the mean KL divergence ``KL(p_float ‖ p_point)`` of the model's prediction with only this point
  quantized from the float prediction (nats per image): how much the point alone moves the output;
- ``top1``: the top-1 accuracy (%) of that model on the labelled images;
- ``sqnr_db``: the point's own SQNR, ``10·log10(Σx² / Σ(x − Q(x))²)`` of its input (the weight, or the activation
  reaching it with the rest float);
- ``hessian_trace`` (weights): the mean diagonal ``tr(H)/n`` of the Hessian of the float model's cross-entropy
  with respect to the weight, by Hutchinson's estimator ``tr(H) = E[vᵀHv]`` over Rademacher vectors ``v`` (one
  Hessian-vector product per sample, by double backpropagation), and HAWQ-V2's ``hawq = tr(H)/n·‖W − Q(W)‖²``,
  the second-order estimate of the loss increase. A trained network sits near, not at, a minimum: a few traces
  can come out negative, and the estimate's noise falls as ``1/√samples``.

Each point keeps the parameters the method calibrated for the whole model (in forward order, after upstream
quantization), so the numbers describe the points of that model.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitq.device import model_device
from vitq.errors import VitqError
from vitq.quantized_model import QuantizedModel, Slot

#: images per forward pass
BATCH = 32


@dataclass(frozen=True)
class PointSensitivity:
    """The sensitivity of one quantizer slot (see the module notes)."""

    slot: str
    role: str
    quantizer: str
    kl: float
    top1: float
    sqnr_db: float
    hessian_trace: float | None = None
    hawq: float | None = None


def quantized_slots(qmodel: QuantizedModel) -> list[Slot]:
    """The slots that quantize something, in model order."""
    return [slot for slot in qmodel.slots() if slot.quantizer is not None and slot.quantizer.enabled]


@contextmanager
def only_quantizing(qmodel: QuantizedModel, slot: Slot) -> Iterator[None]:
    """Run ``qmodel`` with ``slot``'s quantizer alone enabled (every flag is restored on exit)."""
    with qmodel.quantization_disabled():
        slot.quantizer.enabled = True
        yield


def _batches(images: torch.Tensor, labels: torch.Tensor, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images[i:i + BATCH].to(device), labels[i:i + BATCH].to(device)) for i in range(0, len(images), BATCH)]


@torch.no_grad()
def _point_effect(qmodel: QuantizedModel, slot: Slot, batches, float_log_probs) -> tuple[float, float, float]:
    """(mean KL to float, top-1 %, SQNR dB of the point's own quantization) with only ``slot`` quantized."""
    energies = torch.zeros(2, dtype=torch.float64, device=float_log_probs[0].device)

    def record(_module, inputs, output):
        x = inputs[0].double()
        energies.add_(torch.stack([x.square().sum(), (x - output.double()).square().sum()]))

    kl, hits, n = 0.0, 0, 0
    handle = slot.quantizer.register_forward_hook(record)
    try:
        with only_quantizing(qmodel, slot):
            for (images, labels), reference in zip(batches, float_log_probs, strict=True):
                log_probs = qmodel(images).double().log_softmax(-1)
                kl += float(F.kl_div(log_probs, reference, log_target=True, reduction="sum"))
                hits += int((log_probs.argmax(-1) == labels).sum())
                n += len(labels)
    finally:
        handle.remove()
    signal, noise = energies.tolist()
    sqnr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
    return kl / n, 100.0 * hits / n, sqnr


def hutchinson_traces(qmodel: QuantizedModel, weights: Sequence[torch.Tensor], batches, samples: int,
                      seed: int = 0) -> list[float]:
    """``tr(H_W)`` of the float model's mean cross-entropy over ``batches`` for each tensor of ``weights``:
    Hutchinson's ``mean_v v_Wᵀ (H v)_W`` over ``samples`` Rademacher vectors (seeded), the Hessian of the mean
    loss being the mean of the batches' Hessians weighted by their sizes. One product of the whole Hessian with
    all the weights' vectors per sample serves every weight: the cross terms ``v_Wᵀ H_WU v_U`` between two
    weights average to zero, since their signs are independent."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(len(labels) for _, labels in batches)
    traces = torch.zeros(len(weights), dtype=torch.float64)
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with qmodel.quantization_disabled(), torch.enable_grad():
            for _ in range(samples):
                vs = [(torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w) for w in weights]
                for images, labels in batches:
                    loss = F.cross_entropy(qmodel(images), labels) * (len(labels) / total)
                    grads = torch.autograd.grad(loss, weights, create_graph=True)
                    products = torch.autograd.grad(grads, weights, grad_outputs=vs)
                    traces += torch.stack([(v * hv).sum().double().cpu() for v, hv in zip(vs, products, strict=True)])
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    return (traces / samples).tolist()


def point_sensitivity(qmodel: QuantizedModel, images: torch.Tensor, labels: torch.Tensor, *,
                      hutchinson_samples: int = 8, seed: int = 0, progress: bool = True,
                      slots: Collection[str] | None = None) -> list[PointSensitivity]:
    """The sensitivity of every quantizing slot of ``qmodel`` (or of those named in ``slots``) on the labelled
    ``images``, in model order (see the module notes); ``hutchinson_samples=0`` skips the Hessian traces."""
    if len(images) == 0 or len(images) != len(labels):
        raise VitqError(f"sensitivity needs labelled images, got {len(images)} images and {len(labels)} labels")
    if hutchinson_samples < 0:
        raise VitqError(f"hutchinson_samples must be >= 0, got {hutchinson_samples}")
    slots = [slot for slot in quantized_slots(qmodel) if slots is None or slot.name in slots]
    if not slots:
        raise VitqError("the model quantizes nothing: no sensitivity to measure")
    qmodel.eval()
    batches = _batches(images, labels, model_device(qmodel))
    with torch.no_grad(), qmodel.quantization_disabled():
        float_log_probs = [qmodel(x).double().log_softmax(-1) for x, _ in batches]  # KL in float64
    results = []
    for slot in tqdm(slots, desc="sensitivity", disable=not progress):
        kl, top1, sqnr = _point_effect(qmodel, slot, batches, float_log_probs)
        results.append(PointSensitivity(slot.name, slot.role, slot.quantizer.describe(), kl, top1, sqnr))
    weight_slots = [i for i, slot in enumerate(slots) if slot.role == "weight"]
    if hutchinson_samples and weight_slots:
        weights = [slots[i].module.weight for i in weight_slots]
        traces = hutchinson_traces(qmodel, weights, batches, hutchinson_samples, seed)
        for i, weight, trace in zip(weight_slots, weights, traces, strict=True):
            with torch.no_grad():
                error = float((slots[i].quantizer(weight.detach()) - weight).double().square().sum())
            mean_trace = trace / weight.numel()
            results[i] = PointSensitivity(**{**results[i].__dict__, "hessian_trace": mean_trace,
                                             "hawq": mean_trace * error})
    return results


__all__ = ["PointSensitivity", "hutchinson_traces", "only_quantizing", "point_sensitivity", "quantized_slots"]
