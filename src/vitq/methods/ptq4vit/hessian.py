"""PTQ4ViT's Hessian-guided search (Yuan et al., ECCV 2022; docs/methods/ptq4vit.md) of the quantizers of
one product layer.

A *product layer* computes ``O = op(a, b)`` from two quantized operands: a Linear or the patch-embedding conv
(``a`` = input, ``b`` = weight), or one of the attention matmuls (``q·kᵀ``: a = q, b = k; ``A·v``: a = softmax
output, b = v). Quantizing the operands changes the output to ``Ô = op(Q_a(a), Q_b(b))``. PTQ4ViT approximates the
task loss's change by a second-order term whose Hessian is the diagonal Fisher ``diag((∂L/∂O)²)``, so each
candidate is scored by::

    metric(Ô) = −mean( (∂L/∂O ⊙ (O − Ô))² )                                  (larger is better)

with ``∂L/∂O`` the gradient of the task loss (the KL divergence to the float model's prediction) w.r.t. the
layer's output on the calibration images (:mod:`vitq.methods.ptq4vit.products` collects it).

:func:`alternating_search` chooses the parameters of ``Q_a`` and ``Q_b`` in turn — weight then activation for
Linear/conv layers, A then B for matmuls — for ``rounds`` rounds (3 in PTQ4ViT), the other operand fixed at its
current quantization. Candidates:

- a symmetric uniform quantizer: PTQ4ViT's grid ``Δ ∈ linspace(0.01, 1.2, eq_n)·max|x|/(2^(b−1) − ½)`` (per
  quantization group: e.g. each of q, k, v's weight rows for ``qkv``, each output channel for the patch
  embedding), starting from ``Δ = max|x|/(2^(b−1) − ½)``;
- an asymmetric uniform quantizer (Q-HyViT's scheme choice): the min-max range ``[lo, hi]`` scaled by the same
  factors, ``[f·lo, f·hi]``;
- any other kind: its own :meth:`~vitq.quantizers.Quantizer.search_candidates` (twin uniform: the split point or
  the positive step), starting from its current parameters; a kind without candidates keeps its calibration.

Weight groups along the output channels are chosen independently (each output channel depends on one group's
step only, so the per-group choice is the joint optimum); every other quantizer is chosen as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer
from vitq.quantizers.ranges import minmax_range
from vitq.quantizers.twin_uniform import step_factors
from vitq.quantizers.uniform import UniformQuantizer, uniform_params

#: PTQ4ViT's number of alternating weight/activation (A/B) rounds
ROUNDS = 3

Params = dict[str, torch.Tensor]


def hessian_metric(out: torch.Tensor, ref: torch.Tensor, grad: torch.Tensor) -> float:
    """PTQ4ViT's score ``−mean((grad ⊙ (ref − out))²)`` (float64 accumulation; larger is better)."""
    return -float(((ref - out) * grad).double().square().mean())


def weighted_error(out: torch.Tensor, ref: torch.Tensor, grad_sq: torch.Tensor,
                   channel_dim: int | None = None) -> torch.Tensor:
    """``Σ grad² ⊙ (out − ref)²`` in float64: the total (shape [1]), or per index of ``channel_dim``.

    Overwrites ``out`` (a fresh candidate output). For one candidate set of equal-sized outputs, ranking by this
    sum is ranking by :func:`hessian_metric`.
    """
    err = out.sub_(ref).square_().mul_(grad_sq)
    if channel_dim is None:
        return err.sum(dtype=torch.float64).reshape(1)
    dims = [d for d in range(err.ndim) if d != channel_dim % err.ndim]
    return err.sum(dim=dims, dtype=torch.float64)


def _is_grid_uniform(quantizer: Quantizer) -> bool:
    return type(quantizer) is UniformQuantizer and quantizer.symmetric and quantizer.signed


def _is_asymmetric_uniform(quantizer: Quantizer) -> bool:
    return type(quantizer) is UniformQuantizer and not quantizer.symmetric and quantizer.granularity != "group"


def uniform_step_candidates(quantizer: UniformQuantizer, x: torch.Tensor, eq_n: int) -> list[Params]:
    """PTQ4ViT's step grid for a symmetric signed uniform quantizer, per quantization group of ``x``. Installs the
    starting point ``Δ = max|x|/(2^(b−1) − ½)``."""
    quantizer.calibrate(x)  # min-max: Δ = max|x|/(2^(b−1) − 1) per group
    base = quantizer.scale.detach().double() * quantizer.q_max / (quantizer.q_max + 0.5)
    zero = torch.zeros_like(quantizer.zero_point)
    quantizer.set_params({"scale": base.float(), "zero_point": zero})
    return [{"scale": (base * f).float(), "zero_point": zero} for f in step_factors(eq_n).tolist()]


def asymmetric_range_candidates(quantizer: UniformQuantizer, x: torch.Tensor, eq_n: int) -> list[Params]:
    """The same grid for an asymmetric uniform quantizer: the min-max range ``[lo, hi]`` of each group scaled by
    each factor, ``[f·lo, f·hi]`` (step and zero point from the scaled range). Installs the min-max range."""
    lo, hi = minmax_range(quantizer.group_rows(x.detach().float()))
    quantizer.set_range(lo, hi)
    candidates = []
    for f in step_factors(eq_n).tolist():
        scale, zero_point = uniform_params(lo * f, hi * f, quantizer.bits, quantizer.signed, symmetric=False)
        candidates.append({"scale": scale, "zero_point": zero_point})
    return candidates


def ptq4vit_candidates(quantizer: Quantizer, x: torch.Tensor, eq_n: int) -> list[Params]:
    """The candidates PTQ4ViT searches for ``quantizer`` on data ``x`` (see the module docstring)."""
    if _is_grid_uniform(quantizer):
        return uniform_step_candidates(quantizer, x, eq_n)
    if _is_asymmetric_uniform(quantizer):
        return asymmetric_range_candidates(quantizer, x, eq_n)
    return quantizer.search_candidates(x)


def output_groups(quantizer: Quantizer, channel_dim: int | None) -> int | None:
    """Number of independent groups of a weight quantizer along the output channels, or ``None`` if its
    parameters cannot be chosen group by group (then the candidate is chosen as a whole)."""
    if channel_dim is None or not (_is_grid_uniform(quantizer) or _is_asymmetric_uniform(quantizer)):
        return None
    if quantizer.granularity == "tensor" or (quantizer.granularity in ("channel", "head") and quantizer.axis == 0):
        return quantizer.scale.numel()
    return None


def pick_best(candidates: Sequence[Params], errors: torch.Tensor) -> Params:
    """Per group, the candidate with the smallest error (first on ties). ``errors``: [candidates, groups]; every
    candidate's parameters have one entry per group (or one in all when there is a single group)."""
    best = errors.argmin(dim=0)
    if errors.shape[1] == 1:
        return candidates[int(best)]
    return {name: torch.stack([c[name].reshape(-1) for c in candidates]).gather(0, best[None]).reshape(-1)
            for name in candidates[0]}


@dataclass
class SearchProblem:
    """One product layer's search data: ``O = op(a, b)`` on the (row-subsampled) calibration operands.

    ``a_full``/``b_full`` are the operands on all the calibration data (they set the candidate ranges);
    ``a``/``b`` the rows the error is evaluated on, ``grad`` = ∂L/∂O on those rows. ``first``: the operand
    searched first in each round. ``b_channel_dim``: the output dim of ``b``'s output channels (weights), for
    per-group choices.
    """

    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    a: torch.Tensor
    b: torch.Tensor
    grad: torch.Tensor
    a_quantizer: Quantizer | None
    b_quantizer: Quantizer | None
    a_full: torch.Tensor | None = None
    b_full: torch.Tensor | None = None
    first: str = "b"
    b_channel_dim: int | None = None

    def __post_init__(self) -> None:
        if self.first not in ("a", "b"):
            raise VitqError(f"first must be 'a' or 'b', got {self.first!r}")
        self.a_full = self.a if self.a_full is None else self.a_full
        self.b_full = self.b if self.b_full is None else self.b_full


@torch.no_grad()
def alternating_search(problem: SearchProblem, *, eq_n: int, rounds: int = ROUNDS) -> None:
    """Install, for each quantized operand of ``problem``, the candidate with the best :func:`hessian_metric`,
    alternating between the operands for ``rounds`` rounds (one round when only one operand is searched)."""
    if isinstance(eq_n, bool) or not isinstance(eq_n, int) or eq_n < 2:
        raise VitqError(f"eq_n must be an integer >= 2, got {eq_n!r}")
    p = problem
    ref = p.op(p.a, p.b)
    if p.grad.shape != ref.shape:
        raise VitqError(f"gradient shape {tuple(p.grad.shape)} != output shape {tuple(ref.shape)}")
    grad_sq = p.grad.square()
    sides = {"a": (p.a_quantizer, p.a, p.a_full), "b": (p.b_quantizer, p.b, p.b_full)}
    candidates: dict[str, list[Params]] = {}
    for side, (quantizer, _, full) in sides.items():
        if quantizer is not None:
            candidates[side] = ptq4vit_candidates(quantizer, full, eq_n)
            if not candidates[side]:
                quantizer.calibrate(full)
    order = [s for s in (p.first, "b" if p.first == "a" else "a") if candidates.get(s)]
    for _ in range(rounds if len(order) > 1 else min(rounds, 1)):
        for side in order:
            quantizer, x, _ = sides[side]
            other_quantizer, other, _ = sides["b" if side == "a" else "a"]
            fixed = other if other_quantizer is None else other_quantizer.quantize_dequantize(other)
            groups = output_groups(quantizer, p.b_channel_dim) if side == "b" else None
            errors = []
            for q_x in quantizer.fake_quant_candidates(x, candidates[side]):
                out = p.op(q_x, fixed) if side == "a" else p.op(fixed, q_x)
                error = weighted_error(out, ref, grad_sq, p.b_channel_dim if groups else None)
                errors.append(error.reshape(groups, -1).sum(dim=1) if groups else error)
            quantizer.set_params(pick_best(candidates[side], torch.stack(errors)))
