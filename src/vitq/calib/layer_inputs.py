"""Second moments of the inputs of weight layers, gathered stage by stage (GPTQ, ERQ).

Weight-rounding methods see a layer ``y = W x + b`` as a product of matrices: the rows of its input
``X`` (N × C) are a Linear's tokens, or a Conv2d's im2col patches (so the patch embedding is a Linear
on 16×16×3 patches), and ``W`` is the weight reshaped to ``out × C``. Everything those methods need of
the calibration data is in second moments over the rows, accumulated in float64 batch by batch, so
no layer's activations are ever kept (ERQ's reference code pickles all of them to disk):

- ``AᵀA`` with ``A = [X̃, 1]``, ``X̃`` the input *after* the layer's input quantizer (GPTQ's Hessian
  ``2·X̃ᵀX̃/N``, ERQ's ridge systems; the ones column carries the bias);
- with ``float_inputs``: also ``AᵀB`` and ``BᵀB`` with ``B = [X, 1]`` the input *before* it (ERQ's
  Aqer target ``Y = B·[W, b]ᵀ``).

A convolution with ``G > 1`` groups (depthwise: ``G = C_in``) is ``G`` independent layers: its weight is
``out × C`` with ``C = C_in/G·kh·kw``, and the ``out/G`` rows of group ``g`` only meet the patches ``X_g`` of
the input channels of group ``g``, so ``‖X Wᵀ − X Ŵᵀ‖² = Σ_g ‖X_g W_gᵀ − X_g Ŵ_gᵀ‖²`` and every quantity
above is per group. Its rows are ``G × N × C`` and its moments ``G × (C+1) × (C+1)`` (``A_gᵀA_g`` …, the
same ``N`` rows in each group). :meth:`InputMoments.per_group` pairs each group's weight rows with its
moments and :meth:`InputMoments.split_rows` splits a weight by group along that axis, so that the methods round
a group's rows exactly as they would a separate layer's, one group at a time (GPTQ's column loop) or all groups
in one batch of small systems (GPTQ's factorizations, ERQ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.models import Stage
from vitq.nn import QConv2d, QLinear
from vitq.quantizers import DualUniformQuantizer, Quantizer, UniformQuantizer

WeightLayer = QLinear | QConv2d


@dataclass
class InputMoments:
    """Sums over the ``rows`` input rows of one layer (float64, shape ``(C+1) × (C+1)``, or ``G × (C+1) × (C+1)``
    for a convolution with ``G > 1`` groups: one set per group, module docstring)."""

    quantized: torch.Tensor  # AᵀA, A = [X̃, 1]
    cross: torch.Tensor | None  # AᵀB, B = [X, 1]
    float: torch.Tensor | None  # BᵀB
    rows: int

    @property
    def channels(self) -> int:
        return self.quantized.shape[-1] - 1

    @property
    def groups(self) -> int:
        return 1 if self.quantized.dim() == 2 else self.quantized.shape[0]

    def per_group(self, out_features: int) -> list[tuple[slice, InputMoments]]:
        """Each group's weight rows (of ``out_features``, in order) with its ``(C+1) × (C+1)`` moments; a layer
        without groups is one group of every row."""
        if self.quantized.dim() == 2:
            return [(slice(0, out_features), self)]
        size = self._rows_per_group(out_features)

        def part(moment: torch.Tensor | None, g: int) -> torch.Tensor | None:
            return None if moment is None else moment[g]

        return [(slice(g * size, (g + 1) * size),
                 InputMoments(self.quantized[g], part(self.cross, g), part(self.float, g), self.rows))
                for g in range(self.groups)]

    def split_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A tensor over the layer's weight rows (``out × …``) as ``G × out/G × …``, aligned with the moments'
        group axis (unchanged for a layer without groups), so that batched solvers take every group at once."""
        if self.quantized.dim() == 2:
            return rows
        return rows.unflatten(0, (self.groups, self._rows_per_group(rows.shape[0])))

    def _rows_per_group(self, out_features: int) -> int:
        if out_features % self.groups:
            raise VitqError(f"{out_features} weight rows do not split into {self.groups} convolution groups")
        return out_features // self.groups


def weight_layers(qmodel, stage: Stage) -> list[tuple[str, WeightLayer]]:
    """The stage's Linear/Conv2d points whose weight is quantized (enabled), in module order."""
    return [(name, point) for name, point in qmodel.points().items()
            if stage.contains(name) and isinstance(point, QLinear | QConv2d)
            and point.weight_quantizer is not None and point.weight_quantizer.enabled]


def input_rows(layer: WeightLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows ``(N, C)`` matching the columns of :func:`weight_matrix`; ``(G, N, C)`` for a
    convolution with ``G > 1`` groups (group ``g``'s patches, which only its weight rows see)."""
    if isinstance(layer, QLinear):
        return x.reshape(-1, x.shape[-1])
    kernel = layer.weight.shape[2:]
    patches = F.unfold(x, kernel, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    # (B, C_in·kh·kw, L), channel-major: group g's columns are the contiguous block of its C_in/G channels
    grouped = patches.unflatten(1, (layer.groups, -1))
    rows = grouped.permute(1, 0, 3, 2).reshape(layer.groups, -1, grouped.shape[2])  # (G, B·L, C), weight's order
    return rows[0] if layer.groups == 1 else rows


def weight_matrix(layer: WeightLayer) -> torch.Tensor:
    """The weight as ``out × C`` (a view of the parameter)."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


@torch.no_grad()
def set_weight_and_bias(layer: WeightLayer, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Write an ``out × C`` weight (and a bias, created if the layer has none) back into ``layer``."""
    layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
    if bias is None:
        return
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype).clone(), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))


def row_grid(quantizer: Quantizer | None, out_features: int, what: str = "weight",
             group: int | None = None) -> RowGrid:
    """The uniform grid of a weight quantizer, row by row: per-tensor, per-channel along axis 0, (granularity
    ``"group"``) the grid of column group ``group``, or per entry (:class:`DualUniformQuantizer`)."""
    if isinstance(quantizer, DualUniformQuantizer) and quantizer.is_calibrated:
        scale, zero_point = quantizer.entry_params()
        return RowGrid(scale.double(), zero_point.double(), quantizer.q_min, quantizer.q_max)
    if not isinstance(quantizer, UniformQuantizer) or not quantizer.is_calibrated:
        raise VitqError(f"{what}: weight rounding needs a calibrated uniform weight quantizer, got "
                        f"{None if quantizer is None else quantizer.spec()}")
    if quantizer.granularity == "channel" and quantizer.axis != 0:
        raise VitqError(f"{what}: weight rounding needs per-output-channel (axis 0) scales, got axis {quantizer.axis}")
    if quantizer.granularity == "head":
        raise VitqError(f"{what}: weight rounding does not support per-head weight scales")
    scale, zero_point = quantizer.scale.double(), quantizer.zero_point.double()
    if quantizer.granularity == "group":
        if group is None:
            raise VitqError(f"{what}: a group-wise weight quantizer needs the column group")
        scale = scale.reshape(out_features, -1)[:, group]
        zero_point = zero_point.reshape(out_features, -1)[:, group]
    return RowGrid(scale.reshape(-1, 1).expand(out_features, 1), zero_point.reshape(-1, 1).expand(out_features, 1),
                   quantizer.q_min, quantizer.q_max)


@dataclass(frozen=True)
class RowGrid:
    """A uniform grid per weight row (``scale``/``zero_point`` of shape ``out × 1``) or per entry (``out × C``):
    values ``(c − z)·Δ`` for integer codes ``c`` in ``[q_min, q_max]``. ``columns`` selects the entries'
    columns of a per-entry grid (ignored by a per-row one). Leading axes broadcast (``G × out/G × 1``: a grouped
    conv's rows split by group)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    q_min: int
    q_max: int

    def map_rows(self, rows: Callable[[torch.Tensor], torch.Tensor]) -> RowGrid:
        """The grid of the weight rows that ``rows`` makes of the rows of ``scale`` and ``zero_point``: one
        convolution group's slice, or every group's (:meth:`InputMoments.split_rows`)."""
        return RowGrid(rows(self.scale), rows(self.zero_point), self.q_min, self.q_max)

    def _params(self, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale.shape[-1] == 1:
            return self.scale, self.zero_point
        if columns is None:
            raise VitqError("a per-entry weight grid needs the columns being rounded")
        return self.scale[..., columns], self.zero_point[..., columns]

    def _values(self, codes: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        scale, zero_point = self._params(columns)
        return (codes.add(zero_point).clamp(self.q_min, self.q_max) - zero_point) * scale

    def nearest(self, w: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Round to nearest on the grid (the weight quantizer's fake-quant); ``w`` is ``out × k``."""
        return self._values(torch.round(w / self._params(columns)[0]), columns)

    def floor_ceil(self, w: torch.Tensor, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid values just below and just above each weight (equal where clamped or on the grid)."""
        codes = w / self._params(columns)[0]
        return self._values(torch.floor(codes), columns), self._values(torch.ceil(codes), columns)


Run = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def gather_input_moments(run: Run, x: torch.Tensor, layers: Sequence[WeightLayer], *, float_inputs: bool = False,
                         reference: tuple[Run, torch.Tensor] | None = None,
                         input_quantizers: Sequence[Quantizer | None] | None = None,
                         batch_size: int = 32) -> tuple[list[InputMoments], torch.Tensor]:
    """Run ``run`` on ``x`` (batched) and accumulate every layer's :class:`InputMoments`.

    ``X̃`` is each layer's input in this run after ``input_quantizers`` (default: each layer's
    ``input_quantizer`` if enabled), applied even if the run itself has quantization disabled (ERQ takes
    ``X̃ = Q(X_float)``). ``float_inputs``: ``B`` is the same input before the quantizer; or ``reference =
    (run_ref, x_ref)``: ``B`` is the layer's input when ``run_ref`` runs on ``x_ref`` (the same images,
    batch for batch, e.g. through the float model), so that every quantized row is paired with its float
    counterpart. Returns the moments and ``run``'s output.
    """
    if input_quantizers is None:
        input_quantizers = [q if q is not None and q.enabled else None for q in (lay.input_quantizer for lay in layers)]
    moments: list[InputMoments | None] = [None] * len(layers)
    reference_rows: list[torch.Tensor | None] = [None] * len(layers)
    recording = [False]

    def hook_for(index: int, layer: WeightLayer, quantizer: Quantizer | None):
        def hook(module, args):
            x_in = args[0].detach()
            if recording[0]:  # the reference pass of this batch: keep the rows to pair with
                reference_rows[index] = _with_ones(input_rows(layer, x_in))
                return
            x_q = x_in if quantizer is None else quantizer.quantize_dequantize(x_in)
            quantized = _with_ones(input_rows(layer, x_q))
            new = InputMoments(quantized.mT @ quantized, None, None, quantized.shape[-2])
            plain = reference_rows[index] if reference is not None else \
                _with_ones(input_rows(layer, x_in)) if float_inputs else None
            if plain is not None:
                if plain.shape != quantized.shape:
                    raise VitqError("the reference run does not give the same rows as the calibration run")
                new.cross, new.float = quantized.mT @ plain, plain.mT @ plain
            moments[index] = new if moments[index] is None else _add(moments[index], new)
        return hook

    def paired(chunk: torch.Tensor, start: int) -> torch.Tensor:
        if reference is not None:
            recording[0] = True
            try:
                reference[0](reference[1][start:start + chunk.shape[0]])
            finally:
                recording[0] = False
        return run(chunk)

    handles = [layer.register_forward_pre_hook(hook_for(i, layer, q))
               for i, (layer, q) in enumerate(zip(layers, input_quantizers, strict=True))]
    try:
        out = torch.cat([paired(chunk, i * batch_size) for i, chunk in enumerate(x.split(batch_size))])
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, m in enumerate(moments) if m is None]
    if missing:
        raise VitqError(f"{len(missing)} layer(s) were not reached by the calibration run")
    return moments, out


def _with_ones(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)


def _add(a: InputMoments, b: InputMoments) -> InputMoments:
    def plus(u, v):
        return None if u is None else u + v

    return InputMoments(a.quantized + b.quantized, plus(a.cross, b.cross), plus(a.float, b.float), a.rows + b.rows)
