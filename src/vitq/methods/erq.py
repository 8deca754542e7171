"""``erq``: ERQ (Zhong et al., ICML 2024), error reduction for ViT PTQ, on the RepQ-ViT activations
(docs/methods/erq.md).

Activations are quantized exactly as ``repq-vit``. Then, stage by stage, every quantized Linear and Conv2d
(on its im2col patches) goes through two closed-form steps, both on the layer's
float input rows ``X`` from the *float* model and their quantized version ``X̃ = Q(X)`` (the reference
code's convention), with ``A = [X̃, 1]``, ``B = [X, 1]`` and ``W̄ = [W, b]``:

**Aqer** (activation quantization error reduction): the float weights absorb the activation error::

    δW̄ = argmin ‖A (W̄ + δW̄)ᵀ − B W̄ᵀ‖² + λ‖δW̄‖²   ⇒   δW̄ᵀ = (AᵀA + λI)⁻¹ (AᵀB − AᵀA) W̄ᵀ

(the paper's ``δWᵀ = −(E[x̃x̃ᵀ] + λI)⁻¹ E[x̃ δxᵀ] Wᵀ`` with ``δx = x̃ − x``, bias included).

**Wqer** (weight quantization error reduction), after the weight quantizer is re-calibrated on the
Aqer weights: iterative halving over the input columns in natural order. Each step takes the first half
``S1`` of the columns still in float, rounds them to the nearest grid value, refines the rounding
directions on the proxy ``E‖δW x‖² = δW (μμᵀ + Σ) δWᵀ = δW E[xxᵀ] δWᵀ`` (greedy floor/ceil flips, at
most ``refine_iters`` per row and step), then compensates on the remaining columns ``S2`` by ridge
regression::

    δW_S2ᵀ = −(A_S2ᵀA_S2 + λI)⁻¹ A_S2ᵀA_S1 δW_S1ᵀ

The bias column is last, so it is never rounded and absorbs the final compensation.

A convolution with ``G > 1`` groups (depthwise included) is ``G`` independent layers: the ``out/G`` rows of
group ``g`` only meet the patches of its input channels, so both objectives split into a sum over groups of the
same problem on ``A_g = [X̃_g, 1]``, ``B_g = [X_g, 1]`` and ``W̄_g`` (``C_in/G·kh·kw + 1`` columns), ridge
penalty included (``λ‖δW̄‖² = Σ_g λ‖δW̄_g‖²``, every group has the same ``N`` rows): each group is solved with
its own ``(C+1) × (C+1)`` systems and the same λ, exactly as if it were a separate convolution. The groups
share the column order, so all of them go through each step together, as one batch of small systems (a
depthwise 3×3 conv: ``C_in`` systems of 10 × 10, far faster batched than one by one). The grid is re-calibrated
on the whole layer's Aqer weights (per row), and the safeguard below compares the layer's total.

``inputs`` (option): ``"float"`` (default, the reference code) takes ``X̃ = Q(X)`` from the float model's
input; ``"quantized"`` takes ``X̃`` from the quantized model (everything upstream quantized and already
corrected, as GPTQ's inputs), paired row by row with the float model's ``X`` as the target, so Aqer also
absorbs the error that arrives from upstream. This variant is vitq's, not the paper's.

Conventions (document for reproducibility):

- Aqer is not applied to the patch embedding (the reference code applies it to Linear layers only; here the
  image input is quantized at 8 bits, whose error Aqer would only overfit). Wqer rounds it like any layer.
- Weight ranges: per row, ERQ's wider percentile search (0.97 … 1, :data:`WEIGHT_PERCENTILES`), on the
  weights before rounding (after Aqer).

- ``lam`` is λ for 32 calibration images on the *un-normalized* sums over all rows (tokens), as in the
  reference code (λ = 0.1·coe, coe = 20000); it is scaled by ``calib images / 32`` for other set sizes.
  ``lam_head`` (0.1) is Aqer's λ for inputs with one row per image (the classifier head), as in the code.
- The greedy flip picks, per row, the flip with the largest exact decrease of the proxy (the code picks
  the largest gradient entry then snaps); either way a flip is kept only if the proxy decreases.
- Safeguard: a layer whose calibration error ``‖A Ŵᵀ − B W̄ᵀ‖²`` after ERQ exceeds that of plain
  rounding of its original weights keeps the plain rounding (and its original grid); the per-layer
  errors are in :attr:`ERQ.layer_errors`.
- ``dual_uniform`` (off by default): the journal version's extended variant (TPAMI 2025,
  docs/methods/erq.md#dual-uniform-weights-journal-version), two scales per weight row for the layers fed by a
  LayerNorm (:mod:`vitq.quantizers.dual_uniform`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, FiniteFloat

from vitq.calib.layer_inputs import (
    InputMoments,
    RowGrid,
    gather_input_moments,
    row_grid,
    set_weight_and_bias,
    weight_layers,
    weight_matrix,
)
from vitq.calib.runner import run_batched, run_stagewise_with_float
from vitq.errors import VitqError
from vitq.methods.base import DEPLOYMENT_SETTINGS, MethodOptions, Paper, register_method
from vitq.methods.repq_vit import RepQViT
from vitq.methods.repq_vit.reparam import recalibrate_weight, reparameterize_stage
from vitq.models import Stage
from vitq.quantizers.ranges import WEIGHT_PERCENTILES

log = logging.getLogger(__name__)

#: ``inputs`` option: where X̃ comes from (module docstring)
#: the reference calibration set size that ``lam`` is given for
REFERENCE_IMAGES = 32


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """``(gram + λI)⁻¹ rhs`` for a symmetric positive semi-definite ``gram`` (float64; a batch of them along
    leading axes, e.g. one per convolution group)."""
    system = gram + lam * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if bool(info.any()):
        raise VitqError(f"ridge system is singular (λ = {lam}); use a larger lam")
    return torch.cholesky_solve(rhs, factor)


def aqer_update(weight: torch.Tensor, moments: InputMoments, lam: float) -> torch.Tensor:
    """Aqer: ``W̄ + δW̄`` for ``W̄ = [W, b]`` (``out × (C+1)``), ``δW̄ᵀ = (AᵀA + λI)⁻¹ (AᵀB − AᵀA) W̄ᵀ``.

    For grouped moments (``G × (C+1) × (C+1)``) ``weight`` is ``G × out/G × (C+1)``
    (:meth:`InputMoments.split_rows`): each group's rows are solved with its own system."""
    if moments.cross is None:
        raise VitqError("Aqer needs the float input moments (gather them with float_inputs=True)")
    w = weight.double()
    delta = _ridge_solve(moments.quantized, (moments.cross - moments.quantized) @ w.mT, lam)
    return w + delta.mT


def refine_rounding(delta: torch.Tensor, other: torch.Tensor, proxy: torch.Tensor, iterations: int) -> torch.Tensor:
    """Greedy floor/ceil flips lowering each row's ``δ H δᵀ`` (``H = proxy``, ``k × k``).

    ``delta`` (``out × k``) is the rounding error of each weight, ``other`` the error of its other
    rounding direction. Each iteration flips, in every row, the entry whose flip lowers the row's proxy
    most, if any does (``f(δ + d·e_j) = f + d·g_j + d²·H_jj`` with ``g = 2δH``). Returns the new ``δ``.
    With leading group axes (``delta``: ``G × out/G × k``, ``proxy``: ``G × k × k``) each group's rows use
    their group's proxy; rows are independent, so this is the per-group call, batched.
    """
    delta, other = delta.clone(), other.clone()
    diag = torch.diagonal(proxy, dim1=-2, dim2=-1).unsqueeze(-2)
    grad = 2.0 * delta @ proxy
    for _ in range(iterations):
        step = other - delta
        gain = step * grad + step.square() * diag
        best, column = gain.min(dim=-1)
        better = best < 0
        if not bool(better.any()):
            break
        rows = better.nonzero(as_tuple=True)  # (row,) or (group, row) of the rows that flip
        entries = (*rows, column[rows])
        d = step[entries]
        other[entries] = delta[entries]
        delta[entries] += d
        grad[rows] += 2.0 * d[:, None] * proxy[(*rows[:-1], column[rows])]
    return delta


def wqer_round(weight: torch.Tensor, gram: torch.Tensor, grid: RowGrid, *, lam: float,
               refine_iters: int = 100) -> torch.Tensor:
    """Wqer: round ``W̄ = [W, b]`` (``out × (C+1)``; the last column, the bias, stays float).

    ``gram`` is ``AᵀA`` (``(C+1) × (C+1)``). Returns the new ``W̄`` (float64) with ``W`` on ``grid``.
    For a grouped layer every argument carries the group axis first (``G × out/G × (C+1)``,
    ``G × (C+1) × (C+1)``, the grid split the same way: :meth:`InputMoments.split_rows`); the groups share the
    column order, so their halving steps run together.
    """
    current = weight.double().clone()
    remaining = torch.arange(current.shape[-1], device=current.device)
    while remaining.numel() > 1:
        half = remaining.numel() // 2
        first, rest = remaining[:half], remaining[half:]
        w = current[..., first]
        nearest = grid.nearest(w, first)
        floor, ceil = grid.floor_ceil(w, first)
        delta = nearest - w
        if refine_iters > 0:
            other = torch.where(nearest == floor, ceil, floor) - w
            delta = refine_rounding(delta, other, gram[..., first, :][..., first], refine_iters)
        compensation = -_ridge_solve(gram[..., rest, :][..., rest], gram[..., rest, :][..., first] @ delta.mT, lam)
        current[..., first] = grid.nearest(w + delta, first)  # exactly on the grid (w + δ may be off by an ulp)
        current[..., rest] += compensation.mT
        remaining = rest
    return current


def calibration_error(weight: torch.Tensor, reference: torch.Tensor, moments: InputMoments) -> float:
    """``‖A Ŵᵀ − B W̄ᵀ‖²`` summed over rows, from the moments (``weight`` = Ŵ, ``reference`` = W̄, both aug.;
    split by group for grouped moments, then summed over the groups too)."""
    w, ref = weight.double(), reference.double()
    return float(((w @ moments.quantized) * w).sum() - 2.0 * ((w @ moments.cross) * ref).sum()
                 + ((ref @ moments.float) * ref).sum())


def _takes_the_image(layer) -> bool:
    """The patch embedding: ERQ's code leaves its input float and never applies Aqer to it (docs/methods/erq.md)."""
    return layer.slot_roles.get("input_quantizer") == "image"


@contextmanager
def _weights_swapped(layers, weights) -> Iterator[None]:
    """Temporarily give each layer the ``(weight, bias)`` in ``weights`` (a bias of ``None``: zeros)."""
    current = [(layer.weight.data, None if layer.bias is None else layer.bias.data) for layer in layers]
    try:
        for layer, (weight, bias) in zip(layers, weights, strict=True):
            layer.weight.data = weight
            if layer.bias is not None:
                layer.bias.data = torch.zeros_like(layer.bias.data) if bias is None else bias
        yield
    finally:
        for layer, (weight, bias) in zip(layers, current, strict=True):
            layer.weight.data = weight
            if bias is not None:
                layer.bias.data = bias


@dataclass(frozen=True)
class LayerError:
    """Calibration error of one layer: plain rounding of its original weights vs ERQ."""

    name: str
    plain: float
    erq: float
    kept_plain: bool


@register_method("erq")
class ERQ(RepQViT):
    round_to_nearest_twin = "repq-vit"
    extra_settings = ((3, 4), *DEPLOYMENT_SETTINGS)  # W3A4: the weight-rounding papers' low-bit setting
    paper = Paper("ERQ: Error Reduction for Post-Training Quantization of Vision Transformers", "Zhong et al.",
                  "ICML", 2024)
    summary = "Aqer (ridge regression moves the activation error into the weights) + Wqer (rounding refinement)"
    weight_percentiles = WEIGHT_PERCENTILES

    class Options(MethodOptions):
        aqer: bool = Field(True, description="Aqer: ridge regression of the activation-quantization error")
        wqer: bool = Field(True, description="Wqer: iterative halving with greedy rounding flips")
        lam: FiniteFloat = Field(2000.0, ge=0,
                                 description="ridge λ for 32 calibration images, scaled with their number")
        lam_head: FiniteFloat = Field(0.1, ge=0,
                                      description="Aqer's λ of the head (one input row per image), scaled the same way")
        refine_iters: int = Field(100, ge=0, description="greedy rounding-flip iterations of Wqer")
        dual_uniform: bool = Field(False, description="two scales per weight row for qkv/fc1 (the journal version)")
        inputs: Literal["float", "quantized"] = Field(
            "float", description="layer inputs from the float model (the paper) or the quantized one")

    options: Options

    def __init__(self, config) -> None:
        super().__init__(config)
        self.layer_errors: list[LayerError] = []

    def slot_spec(self, slot) -> dict[str, Any] | None:
        # the extended variant: two scales per row for the layers fed by a LayerNorm (qkv, fc1; Swin reduction)
        if self.options.dual_uniform and slot.role == "weight" and \
                slot.module.slot_roles.get("input_quantizer") == "post_ln":
            return {"kind": "dual_uniform", "bits": self.config.w_bits, "init": self.init,
                    "search_percentiles": list(self.weight_percentiles)}
        return super().slot_spec(slot)

    def calibrate(self, qmodel, images, *, progress: bool = True) -> None:
        self.layer_errors = []
        size = images.shape[0] / REFERENCE_IMAGES

        def visit(stage: Stage, x: torch.Tensor, x_float: torch.Tensor) -> torch.Tensor:
            reparameterize_stage(qmodel, stage, x, target="mean")  # the RepQ-ViT activations
            layers = weight_layers(qmodel, stage)
            input_quantizers = [q if q is not None and q.enabled else None
                                for q in (layer.input_quantizer for _, layer in layers)]
            modules = [layer for _, layer in layers]

            originals = [(layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
                         for layer in modules]

            def float_run(chunk: torch.Tensor) -> torch.Tensor:
                # the original float model: no quantizer, and the weights as they were before this stage's changes
                with qmodel.quantization_disabled(), _weights_swapped(modules, originals):
                    return stage.run(chunk)

            def reduce(name: str, layer, m: InputMoments) -> None:
                one_row_per_image = m.rows == x_float.shape[0]
                self._reduce_errors(name, layer, m, lam=size * self.options.lam,
                                    lam_aqer=size * (self.options.lam_head if one_row_per_image else self.options.lam))

            if self.options.inputs == "float":
                moments, out_float = gather_input_moments(float_run, x_float, modules, float_inputs=True,
                                                          input_quantizers=input_quantizers)
                for (name, layer), m in zip(layers, moments, strict=True):
                    reduce(name, layer, m)
            else:
                # one layer at a time, so that each one's inputs come through the layers already corrected
                # before it (correcting them all from the same uncorrected pass would correct twice)
                out_float = run_batched(float_run, x_float, 32)
                for (name, layer), quantizer in zip(layers, input_quantizers, strict=True):
                    (m,), _ = gather_input_moments(stage.run, x, [layer], reference=(float_run, x_float),
                                                   input_quantizers=[quantizer])
                    reduce(name, layer, m)
            return out_float

        run_stagewise_with_float(qmodel, images, visit, progress=progress, desc="erq")
        kept = sum(e.kept_plain for e in self.layer_errors)
        if kept:
            log.info("erq: %d of %d layers kept plain rounding (lower calibration error)", kept, len(self.layer_errors))

    def _reduce_errors(self, name: str, layer, moments: InputMoments, *, lam: float, lam_aqer: float) -> None:
        """Aqer, Wqer and the safeguard on one layer; a grouped conv's groups each with their own moments, in one
        batch (module docstring)."""
        weight = weight_matrix(layer).detach().double()
        bias = layer.bias.detach().double() if layer.bias is not None else weight.new_zeros(weight.shape[0])
        original = torch.cat([weight, bias[:, None]], dim=1)
        split = moments.split_rows  # out × … → G × out/G × … for a grouped conv (all groups solved at once)
        quantizer = layer.weight_quantizer
        original_params = quantizer.get_params()
        plain_grid = row_grid(quantizer, weight.shape[0], name)
        current = original
        if self.options.aqer and not _takes_the_image(layer):
            current = aqer_update(split(current), moments, lam_aqer).flatten(0, -2)
            set_weight_and_bias(layer, current[:, :-1], current[:, -1])
            recalibrate_weight(layer)
        grid = row_grid(quantizer, weight.shape[0], name)
        columns = torch.arange(weight.shape[1], device=weight.device)
        if self.options.wqer:
            current = wqer_round(split(current), moments.quantized, grid.map_rows(split), lam=lam,
                                 refine_iters=self.options.refine_iters).flatten(0, -2)
        else:
            current = torch.cat([grid.nearest(current[:, :-1], columns), current[:, -1:]], dim=1)
        plain = torch.cat([plain_grid.nearest(weight, columns), bias[:, None]], dim=1)
        errors = (calibration_error(split(plain), split(original), moments),
                  calibration_error(split(current), split(original), moments))
        kept_plain = errors[1] > errors[0]
        if kept_plain:
            current = plain
            quantizer.set_params(original_params)
        self.layer_errors.append(LayerError(name, *errors, kept_plain))
        set_weight_and_bias(layer, current[:, :-1], current[:, -1])
