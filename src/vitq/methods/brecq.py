"""``brecq``: BRECQ (Li et al., ICLR 2021) block reconstruction on the ``repq-vit`` calibration.

The model is calibrated exactly as ``repq-vit`` (log√2 softmax, post-LayerNorm reparameterization, percentile
ranges), then every block is reconstructed (:mod:`vitq.calib.recon`): AdaRound weight rounding and LSQ activation
steps learned jointly against the float block's output, BRECQ's loss and β schedule. So the difference to
``repq-vit`` is the reconstruction alone. Use a larger ``--calib-size`` (the papers: 1024 images). Settings:
``--recon KEY=VALUE`` (:class:`~vitq.config.ReconConfig`).

Options (shared by ``qdrop``, ``adaround`` and ``aphq-vit``) for the attention quantizers of the released
APHQ-ViT/FIMA-Q code: ``softmax=uniform`` (a uniform post-softmax quantizer, whose step reconstruction learns,
instead of the fixed log√2 one) and ``head_ranges`` (one range per attention head for q, k, v and a uniform
softmax: per index of axis 1 of those tensors, the heads in ViT/DeiT/Swin attention). Per-head activation ranges
have no integer ONNX form (they export with a float path). ``fpcs=true`` initialises the uniform ranges as that code
does before reconstruction: after the reparameterization, every Linear's weight (per row) and input and the q, k, v
ranges are searched by their layer's output error (AdaLog's FPCS, :mod:`vitq.methods.adalog.fpcs`) on the first
:data:`FPCS_IMAGES` calibration images, instead of each tensor's own error over three percentiles.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from vitq.calib.runner import run_stagewise
from vitq.methods.adalog.fpcs import FpcsSettings, fpcs_stage
from vitq.methods.base import MethodOptions, Paper, register_method
from vitq.methods.repq_vit import RepQViT
from vitq.methods.repq_vit.reparam import reparameterize_stage
from vitq.models import Stage
from vitq.quantizers.ranges import REPQ_PERCENTILES, WEIGHT_PERCENTILES

#: the roles of the attention tensors whose axis 1 is the head
HEAD_ROLES = ("attn_q", "attn_k", "attn_v", "softmax")
#: ``fpcs=true`` initialises the ranges on this many calibration images (the released APHQ-ViT code's 128)
FPCS_IMAGES = 128


@register_method("brecq")
class BRECQ(RepQViT):
    round_to_nearest_twin = "repq-vit"
    paper = Paper("BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction", "Li et al.",
                  "ICLR", 2021)
    summary = "block reconstruction: AdaRound weight rounding + LSQ activation steps against the float block"
    reconstructs = True

    class Options(MethodOptions):
        softmax: Literal["log_sqrt2", "uniform"] = Field(
            "log_sqrt2", description="post-softmax quantizer: repq-vit's log√2 (fixed during reconstruction) or "
                                     "uniform (its step learned; the released APHQ-ViT/FIMA-Q code's)")
        head_ranges: bool = Field(False, description="one range per attention head for q, k, v and a uniform "
                                                     "softmax (the released APHQ-ViT/FIMA-Q code's; no integer "
                                                     "export)")
        fpcs: bool = Field(False, description="initialise the uniform weight and activation ranges by their "
                                              "layer's output error (AdaLog's FPCS, as the released APHQ-ViT "
                                              "code) instead of the percentile search")
        weight_ranges: Literal["repq", "wide"] = Field(
            "repq", description="percentiles searched for each weight row's range: repq (0.999-0.99999, "
                                "RepQ-ViT's) or wide (0.97-1, the ERQ and I&S-ViT code's)")

    options: Options

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        if role == "softmax" and self.options.softmax == "uniform":
            spec = super(RepQViT, self).quantizer_spec(role)  # the default structure's: uniform, per tensor
        else:
            spec = super().quantizer_spec(role)
        if self.options.head_ranges and role in HEAD_ROLES and spec is not None and spec["kind"] == "uniform":
            spec = {**spec, "granularity": "channel", "axis": 1}
        return spec

    @property
    def weight_percentiles(self) -> tuple[float, ...]:
        return WEIGHT_PERCENTILES if self.options.weight_ranges == "wide" else REPQ_PERCENTILES

    def calibrate(self, qmodel, images: torch.Tensor, *, progress: bool = True) -> None:
        if not self.options.fpcs:
            super().calibrate(qmodel, images, progress=progress)
            return
        settings = FpcsSettings()

        def visit(stage: Stage, x: torch.Tensor) -> None:
            reparameterize_stage(qmodel, stage, x, target="mean")
            fpcs_stage(qmodel, stage, x, settings)

        run_stagewise(qmodel, images[:FPCS_IMAGES], visit, progress=progress, desc="calibrating (FPCS)")
