"""``dopq-vit``: DopQ-ViT (arXiv 2408.03291), the calibration-only part (docs/methods/dopq-vit.md,
docs/protocol.md#softmax-quantizers-alone, docs/protocol.md#target-cancellation).

DopQ-ViT keeps RepQ-ViT's pipeline (:mod:`vitq.methods.repq_vit`) and changes its two weak points:

- **TanQ** on the post-Softmax attention map (:mod:`vitq.quantizers.tan`, *reconstructed*: the paper's
  exact map is not public), with levels dense near 0 *and* near 1, its parameters chosen per layer by
  the attention-output error ‖A·Q(v) − Q(A)·Q(v)‖² (:func:`vitq.calib.search.attention_output_calibration`).
- **MOSF / SOSF**: the per-tensor target of the post-LayerNorm reparameterization is the *median* of the
  channel scales and zero points (MOSF, "MAD-guided": the median minimises the mean absolute deviation)
  instead of RepQ-ViT's mean, or is *searched* (SOSF) with an optional bound on the folded ratios, by the
  next Linear's output error on the calibration data (docs/protocol.md#target-cancellation: without a bound, the target
  scale cancels and only the zero point matters).

Options (``QuantConfig.options`` / ``--option KEY=VALUE``), also used for the ablation:

- ``softmax``: ``"tanq"`` (default), ``"log_sqrt2"``, ``"log2"`` or ``"uniform"``;
- ``tan_variant``: ``"tan_log"`` (default) or ``"tan"`` (see :mod:`vitq.quantizers.tan`);
- ``target``: ``"median"`` (MOSF, default: with TanQ it ranks above SOSF in the cross-fit on calibration
  images, ``benchmarks/results/dopq_default_selection.md``), ``"mean"`` (RepQ-ViT), ``"search"`` (SOSF) or ``"none"``
  (keep the post-LayerNorm activations per channel: more accurate, **not hardware-friendly**, the
  RepQ-ViT issue #11 trap; reported only as a reference);
- ``ratio_bound``: fold only ``clamp(s_c/s̃, 1/ρ, ρ)`` (``None``: unbounded, as RepQ-ViT);
- ``smooth`` (with ``--reconstruct``): reach the reconstructed model through I&S-ViT's smooth optimization
  (:mod:`vitq.methods.is_vit.smooth`: calibrate with per-channel post-LayerNorm inputs and float weights,
  reconstruct the activation steps, fold the learned steps to ``target``, then the final reconstruction) instead of
  reconstructing the calibrated model directly (``false``, default). docs/methods/dopq-vit.md infers that the paper's
  numbers come from such a pipeline.

The paper's reported numbers also include block reconstruction (a separate stage, :mod:`vitq.calib.recon`); this file
is the calibration-only method, and a reconstruction pass can run after :meth:`DopQViT.calibrate`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, FiniteFloat, model_validator

from vitq.calib.runner import calibrating, run_stagewise
from vitq.calib.search import attention_output_calibration
from vitq.errors import VitqError
from vitq.methods.base import MethodOptions, Paper, register_method
from vitq.methods.is_vit.smooth import smooth_optimization
from vitq.methods.repq_vit import RepQViT
from vitq.methods.repq_vit.reparam import PairContext, reparameterize_stage
from vitq.models import Stage

#: SOSF candidates: target-scale quantiles of the channel scales and ratio bounds (None = unbounded)
SOSF_SCALE_QUANTILES = (0.25, 0.5, 0.75)
SOSF_RATIO_BOUNDS = (None, 8.0, 4.0, 2.0)


@register_method("dopq-vit")
class DopQViT(RepQViT):
    paper = Paper("DopQ-ViT: Towards Distribution-Friendly and Outlier-Aware Post-Training Quantization for Vision "
                  "Transformers", "Yang et al.", "arXiv 2408.03291", 2024)
    summary = "TanQ post-Softmax quantizer, MOSF (median) / SOSF (searched) reparameterization targets"

    class Options(MethodOptions):
        softmax: Literal["tanq", "log_sqrt2", "log2", "uniform"] = Field(
            "tanq", description="post-Softmax quantizer kind")
        tan_variant: Literal["tan_log", "tan"] = Field("tan_log", description="TanQ's level map")
        target: Literal["median", "mean", "search", "none"] = Field(
            "median", description="reparameterization target: MOSF, RepQ-ViT's mean, SOSF, or per channel")
        ratio_bound: FiniteFloat | None = Field(None, gt=1, description="fold only clamp(s_c/s, 1/ρ, ρ) "
                                                                         "(null: unbounded)")
        smooth: bool = Field(False, description="with --reconstruct: reach it through I&S-ViT's smooth optimization")

        @model_validator(mode="after")
        def _smooth_needs_a_fixed_target(self) -> DopQViT.Options:
            if self.smooth and (self.target not in ("mean", "median") or self.ratio_bound is not None):
                raise ValueError("smooth folds the learned steps to a fixed target: use target=median or "
                                 "target=mean, without ratio_bound")
            return self

    options: Options

    def __init__(self, config) -> None:
        super().__init__(config)
        if self.options.smooth and config.reconstruct is None:
            raise VitqError("dopq-vit option smooth is a reconstruction protocol: add --reconstruct")

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        bits = self.config.a_bits
        if role == "softmax":
            kind = self.options.softmax
            if kind == "tanq":
                return {"kind": "tanq", "bits": bits, "variant": self.options.tan_variant}
            if kind == "uniform":
                return {"kind": "uniform", "bits": bits, "granularity": "tensor", "init": self.init}
            return {"kind": kind, "bits": bits}
        if role == "post_ln" and self.options.target == "none":
            return {"kind": "uniform", "bits": bits, "granularity": "channel", "axis": -1, "init": self.init}
        return super().quantizer_spec(role)

    def calibrate(self, qmodel, images, *, progress: bool = True) -> None:
        if self.options.smooth:
            smooth_optimization(qmodel, images, self.reconstruction(),
                                lambda: self._calibrate_stages(qmodel, images, "none", progress),
                                target=self.options.target, seed=self.config.seed, progress=progress)
        else:
            self._calibrate_stages(qmodel, images, self.options.target, progress)

    def _calibrate_stages(self, qmodel, images: torch.Tensor, target: str, progress: bool) -> None:
        """Stage by stage, TanQ (or the chosen softmax quantizer) by the attention-output error, the post-LayerNorm
        inputs reparameterized to ``target`` (``none``: left as they are)."""

        def visit(stage: Stage, x: torch.Tensor) -> None:
            with attention_output_calibration(qmodel.attention_modules(stage)):
                if target == "none":
                    with calibrating(qmodel.stage_quantizers(stage)):
                        stage.run(x)
                else:
                    reparameterize_stage(qmodel, stage, x, target="median" if target == "search" else target,
                                         ratio_bound=self.options.ratio_bound,
                                         target_search=sosf_search if target == "search" else None)

        run_stagewise(qmodel, images, visit, progress=progress)


def sosf_search(ctx: PairContext) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """SOSF: the (s̃, z̃, ρ) with the smallest output error of the next Linear on the calibration data.

    Candidates: s̃ at the {0.25, 0.5, 0.75} quantiles of the (non-degenerate) channel scales, z̃ the
    median zero point, and ρ in {unbounded, 8, 4, 2}. The median-unbounded candidate is MOSF, so SOSF
    is never worse than MOSF on this criterion.
    """
    valid = ~ctx.degenerate
    scales = ctx.scale.detach().double()[valid]
    zero_point = torch.quantile(ctx.zero_point.detach().double()[valid], 0.5)  # midpoint median, as MOSF
    best, best_err = None, math.inf
    for q in SOSF_SCALE_QUANTILES:
        target = (torch.quantile(scales, q), zero_point)
        for bound in SOSF_RATIO_BOUNDS:
            err = ctx.output_error(target, ratio_bound=bound)
            if err < best_err:
                best, best_err = (*target, bound), err
    return best
