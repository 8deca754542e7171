"""``llm-fp4``: LLM-FP4 (Liu et al., EMNLP 2023) on ViTs, calibration only (docs/methods/llm-fp4.md).

- Structure: every quantization point is a ``fp`` quantizer (:class:`~vitq.quantizers.fp.FloatSearchQuantizer`):
  a float format of the point's bit-width whose exponent/mantissa split and real-valued exponent bias (its
  scale) are searched per tensor on the calibration data; weights per output channel (one format per tensor, a
  scale per row), activations per tensor.
- Pre-shifted exponent bias (option ``pre_shift``): the post-LayerNorm inputs of ``qkv``/``fc1`` (Swin:
  ``reduction``) have per-channel ranges spread over orders of magnitude, which one per-tensor exponent bias
  cannot cover. Each channel's bias is split into the tensor's real-valued bias and an integer offset
  ``ρ_c = round(log2(m_c / median(m)))`` (``m_c = max|X_c|`` on the calibration data), and the factor ``2^ρ_c``
  is folded into the LayerNorm affine (``γ_c, β_c ← γ_c/2^ρ_c, β_c/2^ρ_c``) and the next Linear's input column
  (``W[:, c] ← W[:, c]·2^ρ_c``), which keeps the float model exact. A power of two only moves a float number's
  exponent, so the per-tensor format on the folded input quantizes channel ``c`` as a per-channel format with
  exponent bias shifted by ``ρ_c`` would (subnormals and saturation aside): per-channel resolution at
  per-tensor cost. Degenerate channels (constant or empty, as for RepQ-ViT's fold) keep ``ρ_c = 0``.
- Calibration, stage by stage in forward order: the post-LayerNorm maxima are measured with the stage's
  quantizers off and folded, then every quantizer of the stage calibrates on the stage input in forward order.

The paper chooses the bias by the layer's output error (weights and activations alternately); here each tensor's
own squared error chooses it, as ``percentile`` does for integers (the same search for every kind of point).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from vitq.calib.runner import calibrating, run_stagewise
from vitq.methods.base import Method, MethodOptions, Paper, register_method
from vitq.methods.repq_vit.reparam import apply_fold, degenerate_channels, stage_pairs
from vitq.models import Stage


class LLMFP4Options(MethodOptions):
    pre_shift: bool = Field(True, description="fold power-of-two per-channel exponent offsets of the post-LayerNorm "
                                              "inputs into the LayerNorm and the next Linear")


def power_of_two_offsets(maxima: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """``2^ρ_c`` with ``ρ_c = round(log2(m_c / median(m)))`` over the non-degenerate channels (float64); 1 for a
    degenerate channel (zero or non-finite maximum, a tiny one, or a LayerNorm weight of exactly 0)."""
    m = maxima.detach().double().reshape(-1)
    degenerate = degenerate_channels(m, torch.zeros_like(m), norm_weight)
    if bool(degenerate.all()):
        return torch.ones_like(m)
    reference = torch.quantile(m[~degenerate], 0.5)
    offsets = torch.exp2(torch.round(torch.log2(torch.where(degenerate, reference, m) / reference)))
    return torch.where(degenerate, torch.ones_like(offsets), offsets)


@register_method("llm-fp4")
class LLMFP4(Method):
    paper = Paper("LLM-FP4: 4-Bit Floating-Point Quantized Transformers", "Liu et al.", "EMNLP", 2023)
    summary = "float formats searched per tensor (exponent/mantissa split and exponent bias); per-channel " \
              "power-of-two exponent offsets of post-LayerNorm inputs pre-shifted into LayerNorm + next Linear"
    Options = LLMFP4Options

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        spec = super().quantizer_spec(role)
        if spec is None:
            return None
        return {"kind": "fp", "bits": spec["bits"], "granularity": "channel" if role == "weight" else "tensor"}

    def calibrate(self, qmodel, images: torch.Tensor, *, progress: bool = True) -> None:
        def visit(stage: Stage, x: torch.Tensor) -> None:
            if self.options.pre_shift:
                pre_shift_stage(qmodel, stage, x)
            with calibrating(qmodel.stage_quantizers(stage)):
                stage.run(x)

        run_stagewise(qmodel, images, visit, progress=progress)


@torch.no_grad()
def pre_shift_stage(qmodel, stage: Stage, x: torch.Tensor) -> None:
    """Fold the power-of-two per-channel offsets of every quantized post-LayerNorm input of ``stage``, measured on
    the stage input ``x`` with the stage's quantizers off."""
    pairs = [(qmodel.model.get_submodule(n), qmodel.model.get_submodule(lin)) for n, lin in stage_pairs(qmodel, stage)]
    pairs = [(norm, linear) for norm, linear in pairs if getattr(linear, "input_quantizer", None) is not None]
    if not pairs:
        return
    maxima: dict[int, torch.Tensor] = {}

    def record(linear, args, key: int) -> None:
        flat = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
        maxima[key] = flat if key not in maxima else torch.maximum(maxima[key], flat)

    hooks = [linear.register_forward_pre_hook(lambda m, args, key=i: record(m, args, key))
             for i, (_, linear) in enumerate(pairs)]
    try:
        with qmodel.quantization_disabled():
            stage.run(x)
    finally:
        for hook in hooks:
            hook.remove()
    for i, (norm, linear) in enumerate(pairs):
        offsets = power_of_two_offsets(maxima[i], norm.weight)
        apply_fold(norm, linear, offsets, torch.zeros_like(offsets))
