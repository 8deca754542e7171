"""``adalog``: AdaLog (Wu et al., ECCV 2024), calibration only (docs/methods/adalog.md).

What AdaLog changes on the RepQ-ViT pipeline (:mod:`vitq.methods.repq_vit`), all implemented here:

- **post-Softmax**: the adaptive-base log quantizer (:mod:`vitq.quantizers.adalog`, base ``2^(q/37)``, scale
  fixed at 1), ``q`` searched over AdaLog's range [10, 138] by the attention-output error ‖A·Q(v) − Q(A)·Q(v)‖²
  (:func:`vitq.calib.search.attention_output_calibration`);
- **post-GELU** (fc2 input): the same quantizer on ``x + 0.16997`` (AdaLog's shift; the ``−shift`` is what
  AdaLog folds into fc2's bias), scale x base searched by fc2's output error ‖x·Wᵀ − Q(x)·Wᵀ‖² (on every
  :data:`GELU_SEARCH_STRIDE`-th token, bases in steps of :data:`GELU_BASE_STEP`, to fit a CPU budget);
- **q, k, v**: uniform asymmetric, one scale per head;
- **post-LayerNorm**: RepQ-ViT's reparameterization with target ``mean(s)`` and ``round(mean(z))`` (an integer
  zero point), then the per-tensor quantizer re-calibrated on the folded activations;
- **FPCS** (:mod:`vitq.methods.adalog.fpcs`): then, in forward order, every Linear of the stage searches its uniform
  weight (per row) and input (per tensor) (scale, zero point) pairs by its output error, weights and input
  alternating (fc2: its weights, against its AdaLog input); q and k (per head) by the logits error
  ‖q·kᵀ − Q(q)·Q(k)ᵀ‖², alternating; v (per head) by the attention-output error ‖A·v − Q(A)·Q(v)‖²;
- calibration in forward order, stage by stage, each quantizer seeing inputs quantized upstream.

Options: ``fpcs`` (default true; false = the percentile MSE ranges of RepQ-ViT for the uniform quantizers, the
ablation) and ``fpcs_rounds`` (weight/input alternations, default :attr:`FpcsSettings.rounds`).
Not done: AdaLog's joint (scale x base) FPCS refinement of the post-GELU quantizer (its grid search is kept),
and re-searching the softmax base after v's search.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from vitq.calib.runner import run_stagewise
from vitq.calib.search import attention_output_calibration, linear_output_calibration
from vitq.methods.adalog.fpcs import FpcsSettings, fpcs_stage
from vitq.methods.base import MethodOptions, Paper, register_method
from vitq.methods.repq_vit import RepQViT
from vitq.methods.repq_vit.reparam import reparameterize_stage
from vitq.models import Stage
from vitq.quantizers.adalog import DEFAULT_BASES, GELU_SHIFT

#: post-GELU search: every GELU_SEARCH_STRIDE-th token row, bases 10, 14, ..., 138
GELU_SEARCH_STRIDE = 4
GELU_BASE_STEP = 4


@register_method("adalog")
class AdaLog(RepQViT):
    paper = Paper("AdaLog: Post-Training Quantization for Vision Transformers with Adaptive Logarithm Quantizer",
                  "Wu et al.", "ECCV", 2024)
    summary = "adaptive-base log quantizer for softmax and post-GELU, then FPCS (progressive scale search)"

    class Options(MethodOptions):
        fpcs: bool = Field(True, description="FPCS: search every uniform (scale, zero point) by the output error")
        fpcs_rounds: int = Field(FpcsSettings.rounds, ge=1, description="alternating weight/input FPCS rounds")

    options: Options

    def __init__(self, config) -> None:
        super().__init__(config)
        self.fpcs_settings = FpcsSettings(rounds=self.options.fpcs_rounds)

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        bits = self.config.a_bits
        if role == "softmax":
            return {"kind": "adalog", "bits": bits, "fixed_scale": 1.0}
        if role == "post_gelu":
            return {"kind": "adalog", "bits": bits, "shift": GELU_SHIFT, "bases": list(DEFAULT_BASES[::GELU_BASE_STEP])}
        if role in ("attn_q", "attn_k", "attn_v"):  # [batch, heads, tokens, head_dim]: axis 1 = one scale per head
            return {"kind": "uniform", "bits": bits, "granularity": "channel", "axis": 1, "init": self.init}
        return super().quantizer_spec(role)

    def calibrate(self, qmodel, images, *, progress: bool = True) -> None:
        def visit(stage: Stage, x: torch.Tensor) -> None:
            post_gelu = [slot for slot in qmodel.slots() if slot.role == "post_gelu" and stage.contains(slot.name)]
            with attention_output_calibration(qmodel.attention_modules(stage)), \
                    linear_output_calibration(post_gelu, row_stride=GELU_SEARCH_STRIDE):
                reparameterize_stage(qmodel, stage, x, target="mean", round_zero_point=True, recalibrate_input=True)
            if self.options.fpcs:
                fpcs_stage(qmodel, stage, x, self.fpcs_settings)

        run_stagewise(qmodel, images, visit, progress=progress)

