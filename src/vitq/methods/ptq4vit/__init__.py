"""``ptq4vit``: PTQ4ViT (Yuan et al., ECCV 2022), twin uniform quantization + Hessian-guided search
(docs/methods/ptq4vit.md).

Structure (PTQ4ViT's granularity; every quantizer symmetric and signed):

- Linear weights **per tensor**, except ``qkv``: one step each for its q, k and v rows (``head`` granularity,
  3 groups); the patch-embedding conv weights per output channel; option ``weight_granularity="channel"``:
  every weight per output channel;
- the patch-embedding input (the image) is **not** quantized;
- activations per tensor: post-LayerNorm inputs of qkv/fc1, the proj and head inputs, q, k and v;
- post-Softmax: :class:`~vitq.quantizers.twin_uniform.TwinUniformSoftmaxQuantizer` (split point 2^−i);
- post-GELU (fc2 input): :class:`~vitq.quantizers.twin_uniform.TwinUniformGeluQuantizer` (Δ+ = 2^m·Δ− as in the
  paper, option ``gelu_grid="linear"``: the released code's free linear grid).

Calibration, stage by stage in forward order (:func:`vitq.calib.runner.run_stagewise_with_float`):

1. every quantizer of the stage is initialised on the stage's calibration input (min-max, twin: by MSE);
2. ∂L/∂O of each product layer's output (:mod:`vitq.methods.ptq4vit.products`), L = KL(float prediction ‖ prediction
   with this stage quantized, later stages float);
3. layer by layer (qkv, q·kᵀ, A·v, proj, fc1, fc2; conv; head), the layer's operands are captured with the layers
   before it already searched, and its two quantizers are chosen by
   :func:`vitq.methods.ptq4vit.hessian.alternating_search` (3 rounds; weight/activation, A/B).

``inputs`` option: ``"quantized"`` (default) — each layer's operands come from the quantized upstream, as the
paper's sequential description; ``"float"`` — every layer sees the float model's activations (PTQ4ViT's released
code: "parallel quantization", which its README reports more robust with 32 images).

Cost: the search evaluates every candidate step on the layer's output, so it scales with ``eq_n`` x tokens. The
paper searches 100 steps on every token; the default here searches ``eq_n`` = :data:`DEFAULT_EQ_N` steps (PTQ4ViT's
README: 20 or more change top-1 by < 0.3 %) on every :data:`ROW_STRIDE`-th token of each image (every 4th query row
for the attention products), 1/8 of the paper's search work: DeiT-tiny calibrates in about 135 s on one thread of a
busy 2-core machine (``benchmarks/results/ptq4vit``), well under 5 min. ``eq_n=100`` gives the paper's grid.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from vitq.calib.runner import calibrating, run_batched, run_stagewise_with_float
from vitq.methods.base import Method, MethodOptions, Paper, register_method
from vitq.methods.ptq4vit.hessian import ROUNDS, SearchProblem, alternating_search
from vitq.methods.ptq4vit.products import capture_operands, stage_products, task_gradients
from vitq.models import Stage
from vitq.nn import QConv2d

DEFAULT_EQ_N = 50
#: the error is evaluated on every ROW_STRIDE-th token of each image
ROW_STRIDE = 4
#: images per forward/backward chunk of the gradient pass
GRAD_BATCH = 8


@register_method("ptq4vit")
class PTQ4ViT(Method):
    paper = Paper("PTQ4ViT: Post-Training Quantization for Vision Transformers with Twin Uniform Quantization",
                  "Yuan et al.", "ECCV", 2022)
    summary = "twin uniform softmax/post-GELU quantizers, every step by the Hessian-guided output metric"

    class Options(MethodOptions):
        weight_granularity: Literal["tensor", "channel"] = Field(
            "tensor", description="Linear weights per tensor (qkv: one step each for q, k, v) or per output channel")
        eq_n: int = Field(DEFAULT_EQ_N, ge=2, description="candidate steps searched per quantizer (the paper: 100)")
        gelu_grid: Literal["pow2", "linear"] = Field(
            "pow2", description="post-GELU positive step 2^m x the negative one, or the released code's free grid")
        inputs: Literal["quantized", "float"] = Field(
            "quantized", description="layer operands from the quantized upstream, or from the float model "
                                     "(the released code's parallel calibration)")

    options: Options

    def _symmetric(self, bits: int, **granularity: Any) -> dict[str, Any]:
        return {"kind": "uniform", "bits": bits, "signed": True, "symmetric": True, "init": "minmax",
                "granularity": "tensor", **granularity}

    def slot_spec(self, slot) -> dict[str, Any] | None:
        cfg = self.config
        if slot.role == "weight":
            if self.options.weight_granularity == "channel" or isinstance(slot.module, QConv2d):
                return self._symmetric(cfg.w_bits, granularity="channel", axis=0)
            if slot.point.rpartition(".")[2] == "qkv":  # one step each for the q, k and v rows
                return self._symmetric(cfg.w_bits, granularity="head", axis=0, groups=3)
            return self._symmetric(cfg.w_bits)
        return self.quantizer_spec(slot.role)

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        bits = self.config.a_bits
        if role in ("image", "pre_ln"):
            return None
        if role == "weight":
            return self._symmetric(self.config.w_bits)
        if role == "softmax":
            return {"kind": "twin_uniform_softmax", "bits": bits}
        if role == "post_gelu":
            return {"kind": "twin_uniform_gelu", "bits": bits, "grid": self.options.gelu_grid,
                    "eq_n": self.options.eq_n}
        return self._symmetric(bits)

    def calibrate(self, qmodel, images: torch.Tensor, *, progress: bool = True) -> None:
        with qmodel.quantization_disabled(), torch.no_grad():
            target = run_batched(qmodel, images, GRAD_BATCH).softmax(dim=-1)
        stage_index = {stage.name: i for i, stage in enumerate(qmodel.stages())}
        parallel = self.options.inputs == "float"

        def visit(stage: Stage, x: torch.Tensor, x_float: torch.Tensor) -> torch.Tensor:
            self._calibrate_stage(qmodel, stage, stage_index[stage.name], x_float if parallel else x, target)
            with qmodel.quantization_disabled():
                return run_batched(stage.run, x_float, GRAD_BATCH)

        run_stagewise_with_float(qmodel, images, visit, progress=progress)

    def _calibrate_stage(self, qmodel, stage: Stage, index: int, x: torch.Tensor, target: torch.Tensor) -> None:
        quantizers = qmodel.stage_quantizers(stage)
        if not quantizers:
            return
        with calibrating(quantizers):
            run_batched(stage.run, x, GRAD_BATCH)
        products = stage_products(qmodel, stage, ROW_STRIDE)
        output_grads: list[torch.Tensor] = []
        grads = task_gradients(qmodel, index, x, target, products, batch_size=GRAD_BATCH,
                               output_sink=output_grads.append if self._needs_output_grad(qmodel, stage) else None)
        search = self._product_search(qmodel, stage, x, output_grads)
        for product in products:
            if self.options.inputs == "float":
                with qmodel.quantization_disabled():
                    a, b = capture_operands(stage, x, product)
            else:
                a, b = capture_operands(stage, x, product)
            search(product, a, b, grads[product.name])

    def _needs_output_grad(self, qmodel, stage: Stage) -> bool:
        """Whether :meth:`_product_search` needs ∂L/∂(stage output) (PTQ4ViT: no)."""
        return False

    def _product_search(self, qmodel, stage: Stage, x: torch.Tensor, output_grads: list[torch.Tensor]):
        """The search run on each product layer of ``stage`` (``output_grads``: ∂L/∂(stage output) batches when
        :meth:`_needs_output_grad`): PTQ4ViT's alternating search of its two quantizers."""

        def search(product, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor) -> None:
            alternating_search(search_problem(product, a, b, grad), eq_n=self.options.eq_n, rounds=ROUNDS)

        return search


def search_problem(product, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor) -> SearchProblem:
    """The :class:`SearchProblem` of ``product`` with its installed quantizers: operands ``a`` (all rows), ``b`` and
    ``grad`` = ∂L/∂O on ``product.rows``."""
    return SearchProblem(product.op, product.rows(a), b, grad, product.a_quantizer, product.b_quantizer, a_full=a,
                         first=product.first, b_channel_dim=product.b_channel_dim)
