"""``gptq``: GPTQ (Frantar et al., 2022) weight rounding on the RepQ-ViT activation pipeline (docs/methods/gptq.md).

ERQ's "GPTQ*" baseline: activations exactly as ``repq-vit`` (same quantizers, same forward-order
calibration and post-LayerNorm fold), then, stage by stage, the weights of every quantized Linear
and Conv2d (as a Linear on its im2col patches) are rounded column by column, each rounding error
being compensated on the columns not yet rounded (Optimal Brain Surgeon).

For a layer with input rows ``X̃`` (after its input quantizer, with everything upstream already
quantized) the objective is ``‖X̃ Wᵀ − X̃ Ŵᵀ‖²`` whose Hessian is ``H = 2 X̃ᵀX̃ / N``. Rounding
column ``i`` to ``q_i`` and updating the remaining columns ``F`` optimally gives::

    err = (w_i − q_i) / [H_F⁻¹]_ii           (one value per output row)
    w_F ← w_F − err ⊗ [H_F⁻¹]_{i,F}

GPTQ gets every ``H_F⁻¹`` row at once from the upper Cholesky factor of ``H⁻¹`` and applies the
updates lazily in blocks of ``block_size`` columns. Options: ``damp`` (λ = damp·mean diag(H) added to
the diagonal, default 0.01), ``block_size`` (128), ``act_order`` (columns in order of decreasing
``diag(H)``, default off). The grid (per-output-row scale and zero point) is the weight quantizer's,
calibrated on the weights before rounding as in the reference code.

A convolution with ``G > 1`` groups (depthwise included) is ``G`` independent layers: the ``out/G`` rows of
group ``g`` only see the patches ``X̃_g`` of its input channels, so the objective splits into
``Σ_g ‖X̃_g W_gᵀ − X̃_g Ŵ_gᵀ‖²`` and each group's rows are rounded with their own ``H_g = 2 X̃_gᵀX̃_g / N``
(``C_in/G·kh·kw`` columns; damping, dead inputs and ``act_order`` per group) and their rows of the grid, exactly
as :func:`gptq_round` rounds the separate convolutions. All the groups' small Hessians are inverted and factored
in one batch (:func:`inverse_hessian_factor`; a depthwise 3×3 conv has one 9 × 9 Hessian per channel), then
:func:`round_columns` runs each group's column loop.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from operator import itemgetter
from typing import Any

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
from vitq.calib.runner import run_stagewise
from vitq.errors import VitqError
from vitq.methods.base import DEPLOYMENT_SETTINGS, MethodOptions, Paper, register_method
from vitq.methods.repq_vit import RepQViT
from vitq.methods.repq_vit.reparam import reparameterize_stage
from vitq.models import Stage
from vitq.quantizers import build_quantizer

#: ``group_grid(k, columns)``: the grid of column group ``k``; ``columns`` are its current weights
GroupGrid = Callable[[int, torch.Tensor], RowGrid]


def inverse_hessian_factor(hessian: torch.Tensor, *, damp: float = 0.01,
                           act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column order and the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), for ``H`` in that order.

    Dead inputs (``H_ii = 0``) get ``H_ii = 1`` (their column is then rounded without compensation, as in the
    reference code), and ``λ = damp·mean diag(H)`` is added to the diagonal. Row ``i`` of ``U``, divided by
    ``U_ii``, is ``[H_F⁻¹]_{i,F} / [H_F⁻¹]_ii`` for ``F`` = columns ``i..`` (the inverse Hessian of the columns
    still free when column ``i`` is rounded). ``hessian`` is ``C × C``, or ``G × C × C`` (a grouped conv: every
    group's order, λ and factor its own, all factored in one batch).
    """
    h = hessian.detach().double().clone()
    diagonal = h.diagonal(dim1=-2, dim2=-1)  # a view: writing it writes h
    diagonal.masked_fill_(diagonal == 0, 1.0)
    if act_order:
        order = torch.argsort(diagonal, dim=-1, descending=True, stable=True)
        h = h.take_along_dim(order.unsqueeze(-1), dim=-2).take_along_dim(order.unsqueeze(-2), dim=-1)
    else:
        order = torch.arange(h.shape[-1], device=h.device).expand(h.shape[:-1])
    h.diagonal(dim1=-2, dim2=-1).add_(damp * h.diagonal(dim1=-2, dim2=-1).mean(dim=-1, keepdim=True))
    return order, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, grid: RowGrid | None, *, damp: float = 0.01,
               block_size: int = 128, act_order: bool = False, group_size: int | None = None,
               group_grid: GroupGrid | None = None) -> torch.Tensor:
    """GPTQ's rounding of ``weight`` (``out × C``) for the quadratic error with ``hessian`` (``C × C``).

    One ``grid`` for every column, or with ``group_size`` a grid per group of ``group_size`` columns
    (natural order) from ``group_grid(k, current columns of group k)``, asked when the group's first
    column is reached (GPTQ's ``find_params`` on the updated weights; with ``act_order`` the callback
    should return fixed grids, since groups then are not reached in order).

    Returns the rounded weight (float64, every entry on its grid). Dead inputs (``H_ii = 0``) are
    rounded without compensation, as in the reference code.
    """
    order, h_inv = inverse_hessian_factor(hessian, damp=damp, act_order=act_order)
    return round_columns(weight, order, h_inv, grid, block_size=block_size, group_size=group_size,
                         group_grid=group_grid)


def round_columns(weight: torch.Tensor, order: torch.Tensor, h_inv: torch.Tensor, grid: RowGrid | None, *,
                  block_size: int = 128, group_size: int | None = None,
                  group_grid: GroupGrid | None = None) -> torch.Tensor:
    """GPTQ's column loop of :func:`gptq_round`, given :func:`inverse_hessian_factor` of its Hessian (``order``,
    ``h_inv``: one group's, for a grouped conv whose factors were computed in one batch)."""
    if (group_size is None) != (group_grid is None) or (group_size is None and grid is None):
        raise VitqError("gptq_round needs either a grid, or a group_size with a group_grid")
    columns = weight.shape[1]
    w = weight.detach().double()[:, order]
    group_grids: dict[int, RowGrid] = {}
    position = torch.argsort(order)  # position[c] = where natural column c sits in the processing order
    natural_columns = order.tolist()  # read once: the column loop below never waits for the device

    def grid_of(natural: int, current: Callable[[], torch.Tensor]) -> RowGrid:
        if group_size is None:
            return grid
        k = natural // group_size
        if k not in group_grids:
            group_grids[k] = group_grid(k, current()[:, position[k * group_size:(k + 1) * group_size]])
        return group_grids[k]

    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        u = h_inv[start:stop, start:stop]
        for j in range(stop - start):
            def current(start=start, stop=stop, block=block):
                return torch.cat([w[:, :start], block, w[:, stop:]], dim=1)

            natural = order[start + j:start + j + 1]
            q = grid_of(natural_columns[start + j], current).nearest(block[:, j:j + 1], natural)[:, 0]
            err = (block[:, j] - q) / u[j, j]
            block[:, j:] -= err[:, None] * u[j, j:][None, :]
            block[:, j] = q
            errors[:, j] = err
        w[:, start:stop] = block
        w[:, stop:] -= errors @ h_inv[start:stop, stop:]  # lazy update of the later columns
    return w[:, position]


@register_method("gptq")
class GPTQ(RepQViT):
    round_to_nearest_twin = "repq-vit"
    extra_settings = ((3, 4), *DEPLOYMENT_SETTINGS)  # W3A4: the weight-rounding papers' low-bit setting
    paper = Paper("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
                  "Frantar et al.", "ICLR", 2023)
    summary = "Hessian-guided column-by-column weight rounding (Cholesky inverse, lazy block updates)"

    class Options(MethodOptions):
        damp: FiniteFloat = Field(0.01, ge=0, description="dampening added to the Hessian diagonal, x its mean")
        block_size: int = Field(128, ge=1, description="columns rounded per lazy block update")
        act_order: bool = Field(False, description="round the columns in order of decreasing Hessian diagonal")
        group_size: int | None = Field(None, ge=1, description="one scale per row and group of columns "
                                                                "(null: per output channel)")

    options: Options

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        group_size = self.options.group_size
        if role == "weight" and group_size is not None:
            return {"kind": "uniform", "bits": self.config.w_bits, "granularity": "group", "group_size": group_size,
                    "init": self.init}
        return super().quantizer_spec(role)

    def calibrate(self, qmodel, images, *, progress: bool = True) -> None:
        def visit(stage: Stage, x: torch.Tensor) -> None:
            reparameterize_stage(qmodel, stage, x, target="mean")  # the RepQ-ViT activations
            layers = weight_layers(qmodel, stage)
            if not layers:
                return
            moments, _ = gather_input_moments(stage.run, x, [layer for _, layer in layers])
            for (name, layer), m in zip(layers, moments, strict=True):
                self._round_layer(name, layer, m)

        run_stagewise(qmodel, images, visit, progress=progress, desc="gptq")

    def _round_layer(self, name: str, layer, moments: InputMoments) -> None:
        """Round the weight one convolution group at a time (a layer without groups is one group), each group's
        rows with the Hessian ``2·X̃_gᵀX̃_g/N`` of its own inputs (module docstring); the groups' Hessians are
        factored in one batch (a depthwise conv has one tiny Hessian per channel)."""
        weight = weight_matrix(layer)
        quantizer = layer.weight_quantizer
        c = moments.channels
        orders, factors = inverse_hessian_factor(2.0 * moments.quantized[..., :c, :c] / moments.rows,
                                                 damp=self.options.damp, act_order=self.options.act_order)
        rounded = weight.new_empty(weight.shape, dtype=torch.float64)
        column_groups = quantizer.granularity == "group"
        if column_groups:
            if weight.shape[1] % quantizer.group_size:
                raise VitqError(f"{name}: {weight.shape[1]} input columns do not split into groups of "
                                f"{quantizer.group_size}")
            # the grid of each row and column group, filled in as the column loop reaches the group
            params = {param: weight.new_empty(weight.shape[0], weight.shape[1] // quantizer.group_size,
                                              dtype=torch.float64) for param in ("scale", "zero_point")}
            twin_spec = {k: v for k, v in quantizer.spec().items() if k != "group_size"}
            twin_spec.update(granularity="channel", axis=0)
        else:
            grid = row_grid(quantizer, weight.shape[0], name)

        def group_grid(rows: slice, k: int, columns: torch.Tensor) -> RowGrid:
            # GPTQ's find_params on the group's updated weights when it is reached; with act_order the groups
            # are not reached in order, so they keep the grids calibrated on the weights
            if self.options.act_order:
                found = row_grid(quantizer, weight.shape[0], name, group=k).map_rows(itemgetter(rows))
            else:
                twin = build_quantizer(twin_spec)
                twin.calibrate(columns.to(weight.dtype))
                found = row_grid(twin, columns.shape[0], name)
            for param, value in params.items():
                value[rows, k] = getattr(found, param)[:, 0]
            return found

        for (rows, _), order, factor in zip(moments.per_group(weight.shape[0]), orders.reshape(-1, c),
                                            factors.reshape(-1, c, c), strict=True):
            if column_groups:
                rounded[rows] = round_columns(weight[rows], order, factor, None, group_size=quantizer.group_size,
                                              group_grid=partial(group_grid, rows),
                                              block_size=self.options.block_size)
            else:
                rounded[rows] = round_columns(weight[rows], order, factor, grid.map_rows(itemgetter(rows)),
                                              block_size=self.options.block_size)
        if column_groups:
            quantizer.set_params({param: value.reshape(-1).to(getattr(quantizer, param).dtype)
                                  for param, value in params.items()})
        set_weight_and_bias(layer, rounded)
