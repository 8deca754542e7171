"""``q-hyvit``: Q-HyViT (Lee et al., IEEE Internet of Things Journal 2024), PTQ4ViT's Hessian-guided search with
a per-layer choice of quantizer granularity and scheme, and bridge blocks judged by their block output
(docs/methods/q-hyvit.md).

Hybrid CNN-ViTs mix convolutions (BatchNorm folded, SiLU/Hardswish outputs, some ranges far from zero-centred)
with attention. One fixed quantizer layout fits them badly: a symmetric quantizer wastes half its codes on a
one-signed input, a per-tensor weight step is set by its widest channel. Q-HyViT therefore lets every layer pick,
by the same second-order task-loss metric PTQ4ViT searches steps with:

1. its **weights**: per tensor or per output channel (convolutions: per channel), symmetric or asymmetric;
2. its **input** (a uniform quantizer): symmetric (signed codes) or asymmetric (unsigned codes with a zero point).

Each configuration's steps are searched by :func:`~vitq.methods.ptq4vit.hessian.alternating_search`; the weight
configuration is chosen first (the input symmetric), then the input scheme with those weights. The attention
products (q·kᵀ, A·v) and the twin softmax / post-GELU quantizers are PTQ4ViT's.

**Bridge blocks**: a stage holding both a convolution (past the patch embedding) and an attention module is where
the convolutional and the transformer parts meet (MobileViT's block: convolutions, unfold, transformer, fold,
fusion conv). There a layer's configuration is judged by the Hessian-weighted error of the *stage output*
(``Σ (∂L/∂Y ⊙ (Y − Ŷ))²``, ``Y`` the stage's float output on the same input) instead of the layer's own output,
so the choice accounts for what the rest of the block does with the error.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import Field

from vitq.calib.runner import run_batched
from vitq.methods.base import Paper, register_method
from vitq.methods.ptq4vit import GRAD_BATCH, PTQ4ViT, search_problem
from vitq.methods.ptq4vit.hessian import ROUNDS, SearchProblem, alternating_search, weighted_error
from vitq.methods.ptq4vit.products import (
    Product,
)
from vitq.models import Stage
from vitq.nn import QConv2d
from vitq.quantizers import build_quantizer
from vitq.quantizers.uniform import UniformQuantizer


def is_bridge(qmodel, stage: Stage) -> bool:
    """Whether ``stage`` holds both a convolution that is not the patch embedding (its input is not the image) and
    an attention module: a block where the convolutional and the transformer parts of a hybrid model meet."""
    convs = any(isinstance(m, QConv2d) and m.slot_roles["input_quantizer"] != "image" and stage.contains(name)
                for name, m in qmodel.model.named_modules())
    return convs and bool(qmodel.attention_modules(stage))


@register_method("q-hyvit")
class QHyViT(PTQ4ViT):
    paper = Paper("Q-HyViT: Post-Training Quantization of Hybrid Vision Transformers with Bridge Block "
                  "Reconstruction for IoT Systems", "Lee et al.", "IEEE Internet of Things Journal", 2024)
    summary = ("PTQ4ViT's Hessian-guided search; each layer picks weight granularity and weight/input symmetry, "
               "judged by the block output in hybrid bridge blocks")

    class Options(PTQ4ViT.Options):
        select: bool = Field(True, description="choose each layer's weight granularity and weight/input scheme "
                                               "(false: PTQ4ViT's fixed layout)")
        bridge: bool = Field(True, description="judge the choices of a bridge block's layers by the block output")

    options: Options

    def _needs_output_grad(self, qmodel, stage: Stage) -> bool:
        return self.options.select and self.options.bridge and is_bridge(qmodel, stage)

    def _product_search(self, qmodel, stage: Stage, x: torch.Tensor, output_grads: list[torch.Tensor]):
        """Each layer's configuration choice (:func:`_search`), judged by the stage output in a bridge stage."""
        if not self.options.select:
            return super()._product_search(qmodel, stage, x, output_grads)
        score = None
        if output_grads:
            with qmodel.quantization_disabled(), torch.no_grad():
                reference = run_batched(stage.run, x, GRAD_BATCH)
            grad_sq = torch.cat(output_grads).square()

            def score() -> float:
                return _block_error(stage, x, reference, grad_sq)

        def search(product: Product, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor) -> None:
            _search(product, a, b, grad, self._weight_specs(product), self._input_specs(product), self.options.eq_n,
                    score)

        return search

    # ------------------------------------------------------------------ the configurations a layer chooses from
    def _weight_specs(self, product: Product) -> list[dict[str, Any]]:
        """Weight quantizer specs: per tensor (PTQ4ViT's: qkv one step per q/k/v part) or per output channel,
        symmetric or asymmetric; a convolution is per channel only. Empty for the attention products."""
        module = getattr(product, "module", None)
        if module is None or product.b_quantizer is None:
            return []
        bits = self.config.w_bits
        channel = {"granularity": "channel", "axis": 0}
        if isinstance(module, QConv2d):
            layouts = [channel]
        elif product.name.rpartition(".")[2] == "qkv":
            layouts = [{"granularity": "head", "axis": 0, "groups": 3}, channel]
        else:
            layouts = [{"granularity": "tensor"}, channel]
        return [spec for layout in layouts for spec in (self._symmetric(bits, **layout), _asymmetric(bits, **layout))]

    def _input_specs(self, product: Product) -> list[dict[str, Any]]:
        """Input quantizer specs of a Linear/conv whose input is uniform: symmetric or asymmetric, per tensor."""
        if getattr(product, "module", None) is None or type(product.a_quantizer) is not UniformQuantizer:
            return []
        bits = self.config.a_bits
        return [self._symmetric(bits), _asymmetric(bits)]


def _asymmetric(bits: int, **granularity: Any) -> dict[str, Any]:
    return {"kind": "uniform", "bits": bits, "signed": False, "symmetric": False, "init": "minmax",
            "granularity": "tensor", **granularity}


def _install(product: Product, side: str, quantizer) -> None:
    """Put ``quantizer`` in the Linear/conv slot of ``side`` (``"a"``: input, ``"b"``: weight) and in ``product``."""
    setattr(product.module, "input_quantizer" if side == "a" else "weight_quantizer", quantizer)
    setattr(product, f"{side}_quantizer", quantizer)


@torch.no_grad()
def _layer_error(product: Product, problem: SearchProblem) -> float:
    """``Σ (∂L/∂O ⊙ (O − Ô))²`` of the layer's output with its installed quantizers."""
    qa = problem.a if product.a_quantizer is None else product.a_quantizer.quantize_dequantize(problem.a)
    qb = problem.b if product.b_quantizer is None else product.b_quantizer.quantize_dequantize(problem.b)
    return float(weighted_error(product.op(qa, qb), product.op(problem.a, problem.b), problem.grad.square()).sum())


@torch.no_grad()
def _block_error(stage: Stage, x: torch.Tensor, reference: torch.Tensor, grad_sq: torch.Tensor) -> float:
    """``Σ (∂L/∂Y ⊙ (Y − Ŷ))²`` of the stage output with the quantizers as installed."""
    return float(weighted_error(run_batched(stage.run, x, GRAD_BATCH), reference, grad_sq).sum())


def _search(product: Product, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor, weight_specs: list[dict],
            input_specs: list[dict], eq_n: int, block_score=None) -> None:
    """Search ``product``'s quantizers; with specs, first the weight configuration (the input as it is), then the
    input's, each configuration's steps by :func:`alternating_search`, the best by the layer (or block) error."""

    def run() -> float:
        problem = search_problem(product, a, b, grad)
        alternating_search(problem, eq_n=eq_n, rounds=ROUNDS)
        return block_score() if block_score is not None else _layer_error(product, problem)

    if not weight_specs and not input_specs:
        run()
        return
    for side, specs in (("b", weight_specs), ("a", input_specs)):
        best = None
        for spec in specs:
            _install(product, side, build_quantizer(spec))
            error = run()
            if best is None or error < best[0]:  # the searched pair, as the next configuration re-searches both
                best = (error, copy.deepcopy(product.a_quantizer), copy.deepcopy(product.b_quantizer))
        if best is not None:
            for installed_side, quantizer in (("a", best[1]), ("b", best[2])):
                if quantizer is not None:
                    _install(product, installed_side, quantizer)
