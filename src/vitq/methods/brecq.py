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
have no integer ONNX form (they export with a float path).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from vitq.methods.base import MethodOptions, Paper, register_method
from vitq.methods.repq_vit import RepQViT

#: the roles of the attention tensors whose axis 1 is the head
HEAD_ROLES = ("attn_q", "attn_k", "attn_v", "softmax")


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

    options: Options

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        if role == "softmax" and self.options.softmax == "uniform":
            spec = super(RepQViT, self).quantizer_spec(role)  # the default structure's: uniform, per tensor
        else:
            spec = super().quantizer_spec(role)
        if self.options.head_ranges and role in HEAD_ROLES and spec is not None and spec["kind"] == "uniform":
            spec = {**spec, "granularity": "channel", "axis": 1}
        return spec
