"""Mixed precision under a budget: a bit-width per quantization point, chosen from a menu by measured sensitivity.

1. **Sensitivity per bit-width** (:func:`bit_sensitivities`): for each bit-width ``b`` of the menu, the method
   calibrates the model with every point of the budgeted role(s) at ``b`` bits, and each of those points is
   measured alone (:func:`vitq.eval.sensitivity.point_sensitivity`: the mean KL divergence of the prediction
   from the float one, on calibration images). This gives a cost ``c_p(b)`` per point and bit-width. "Alone"
   needs the other weights float: a method that rewrites the float weights (GPTQ, ERQ, reconstruction) leaves
   none, so its weights are measured with its round-to-nearest twin (``repq-vit`` for ``gptq``/``erq``).
2. **Allocation** (:func:`allocate`): every point starts at the widest bit-width; while the budget is exceeded,
   the point whose next narrower bit-width adds the least cost per bit saved, ``(c_p(b') − c_p(b)) / ((b − b')·n_p)``
   with ``n_p`` the point's element count, steps down (ties: model order). The costs are treated as additive
   (the points' errors as independent), the usual first-order assumption of HAWQ-style allocators. The result
   never exceeds the budget; the same costs always give the same allocation.
3. The allocation is a list of ``--override`` lines (``blocks.3.mlp.fc2.weight_quantizer=3``), written to a file
   the user can read, edit and pass back with ``--overrides-file``.

Budgets (:class:`Budget`, ``--budget KIND=VALUE``, one per role): ``w-avg-bits`` (mean bits per weight element),
``a-avg-bits`` (mean bits per activation element of one image), ``w-size-mb`` (the weights' storage at their
bits, 1 MB = 10^6 bytes, without the float parts of the model), ``bops`` (giga bit-operations per image of the
layers with weights: ``Σ MACs·b_w·b_a`` over every Linear and convolution, ``b_a`` the bits of the layer's input
as quantized, 32 for a float input; the weight bits are allocated, the input bits stay as configured. The
attention products ``q·kᵀ`` and ``A·v`` have no weights to allocate and are not counted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitq.api import prepare, quantize
from vitq.config import PointOverride, QuantConfig
from vitq.errors import VitqError
from vitq.eval.sensitivity import point_sensitivity
from vitq.methods.base import weight_sensitivity_config
from vitq.quantized_model import QuantizedModel, Slot
from vitq.quantizers.base import MAX_BITS, MIN_BITS

BUDGET_KINDS = ("w-avg-bits", "a-avg-bits", "w-size-mb", "bops")
#: bits counted for a float input in a BOPs budget
FLOAT_INPUT_BITS = 32
DEFAULT_MENU = (2, 3, 4, 6, 8)


@dataclass(frozen=True)
class Budget:
    """``kind`` (one of :data:`BUDGET_KINDS`) at most ``value``."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        kind, sep, value = text.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or kind not in BUDGET_KINDS or not math.isfinite(number) or number <= 0:
            raise VitqError(f"budget {text!r} must look like KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)} "
                            "and a positive VALUE")
        return cls(kind, number)

    @property
    def weights(self) -> bool:
        """Whether it budgets the weights (else the activations)."""
        return self.kind != "a-avg-bits"

    @property
    def bops(self) -> bool:
        """Whether a point's size is its bit-operations per weight bit (:func:`point_sizes`), not its elements."""
        return self.kind == "bops"

    def total_bits(self, sizes: Mapping[str, int]) -> float:
        """The budget as ``Σ bits·size`` over points of ``sizes`` (elements, or MACs·input bits for ``bops``)."""
        if self.kind == "w-size-mb":
            return self.value * 8e6
        if self.bops:
            return self.value * 1e9
        return self.value * sum(sizes.values())

    def describe(self, bits: Mapping[str, int], sizes: Mapping[str, int]) -> str:
        """What an allocation spends, in the budget's unit."""
        spent = sum(bits[p] * sizes[p] for p in bits)
        if self.kind == "w-size-mb":
            return f"{spent / 8e6:.3f} MB of weights (budget {self.value:g})"
        if self.bops:
            return f"{spent / 1e9:.3f} GBOPs (budget {self.value:g})"
        return f"{spent / sum(sizes.values()):.3f} mean bits (budget {self.value:g})"


def check_menu(menu: Sequence[int]) -> tuple[int, ...]:
    """The menu sorted, without repeats; each a bit-width the quantizers take."""
    if not menu:
        raise VitqError("the bit-width menu is empty")
    for bits in menu:
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise VitqError(f"menu bit-widths must be integers from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return tuple(sorted(set(menu)))


def allocate(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], budget_bits: float) -> dict[str, int]:
    """Bits per point (keys of ``costs``, in order) with ``Σ bits·sizes ≤ budget_bits``, greedily (module notes).

    ``costs[p][b]``: the cost of point ``p`` at ``b`` bits, for the same menu of bit-widths at every point."""
    if not costs:
        raise VitqError("nothing to allocate: no quantization point of the budgeted role")
    menus = {p: sorted(c) for p, c in costs.items()}
    bits = {p: menu[-1] for p, menu in menus.items()}
    spent = sum(bits[p] * sizes[p] for p in bits)
    floor = sum(menu[0] * sizes[p] for p, menu in menus.items())
    if floor > budget_bits:
        raise VitqError(f"the budget is below what the narrowest bit-width of the menu needs ({floor:.0f} > "
                        f"{budget_bits:.0f} bits)")
    order = {p: i for i, p in enumerate(costs)}
    while spent > budget_bits:
        best = None
        for p, menu in menus.items():
            i = menu.index(bits[p])
            if i == 0:
                continue
            lower = menu[i - 1]
            saved = (bits[p] - lower) * sizes[p]
            rate = (costs[p][lower] - costs[p][bits[p]]) / saved
            key = (rate, order[p])
            if best is None or key < best[0]:
                best = (key, p, lower, saved)
        _, point, lower, saved = best
        bits[point] = lower
        spent -= saved
    return bits


def _role_slots(qmodel: QuantizedModel, weights: bool) -> list[Slot]:
    return [slot for slot in qmodel.slots()
            if slot.quantizer is not None and (slot.role == "weight") == weights]


def _input_bits(layer: nn.Module) -> int:
    quantizer = getattr(layer, "input_quantizer", None)
    return quantizer.bits if quantizer is not None and quantizer.enabled else FLOAT_INPUT_BITS


def point_sizes(qmodel: QuantizedModel, image: torch.Tensor, weights: bool, *, bops: bool = False) -> dict[str, int]:
    """Elements per point: its weight, or its activation for one ``image`` ([1, 3, H, W]). With ``bops`` (weights
    only): the layer's bit-operations per weight bit on ``image``, its MACs times its input bits."""
    slots = _role_slots(qmodel, weights)
    if weights and not bops:
        return {slot.name: slot.module.weight.numel() for slot in slots}
    sizes: dict[str, int] = {}

    def record(slot: Slot):
        if not weights:
            return slot.quantizer.register_forward_hook(
                lambda _m, inputs, _o: sizes.__setitem__(slot.name, inputs[0].numel()))
        # each output element is one dot product over a weight row: in_features (in/groups·kh·kw) MACs
        return slot.module.register_forward_hook(lambda layer, _i, output: sizes.__setitem__(
            slot.name, output.numel() * layer.weight[0].numel() * _input_bits(layer)))

    handles = [record(slot) for slot in slots]
    try:
        with torch.no_grad():
            qmodel(image)
    finally:
        for handle in handles:
            handle.remove()
    return {slot.name: sizes[slot.name] for slot in slots}


def bit_sensitivities(model: nn.Module, config: QuantConfig, calib: torch.Tensor, images: torch.Tensor,
                      labels: torch.Tensor, menu: Sequence[int], weights: bool, *, model_name: str | None = None,
                      progress: bool = True, bops: bool = False) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """The cost (KL to float, each point alone, on the labelled ``images``) of every point of the role (weights,
    or activations) at each bit-width of ``menu``, each measured in a copy of ``model`` calibrated by
    ``config``'s method on ``calib`` with all of them at that bit-width; and the points' sizes
    (:func:`point_sizes`, in bit-operations per weight bit with ``bops``). Weights of a method that rewrites the
    float weights are measured with its round-to-nearest twin (:func:`~vitq.methods.base.weight_sensitivity_config`)."""
    if weights:
        config = weight_sensitivity_config(config)
    skeleton = prepare(model, config, model_name=model_name)
    names = [slot.name for slot in _role_slots(skeleton, weights)]
    costs: dict[str, dict[int, float]] = {name: {} for name in names}
    sizes: dict[str, int] = {}
    for bits in check_menu(menu):
        at_bits = config.model_copy(update={"overrides": [
            *config.overrides, *(PointOverride(pattern=name, bits=bits) for name in names)]})
        qmodel = quantize(model, at_bits, calib, model_name=model_name, progress=progress)
        sizes = sizes or point_sizes(qmodel, images[:1], weights, bops=bops)
        for result in point_sensitivity(qmodel, images, labels, hutchinson_samples=0, progress=progress,
                                        slots=costs):
            costs[result.slot][bits] = result.kl
    return costs, sizes


def overrides_text(bits: Mapping[str, int]) -> str:
    """The allocation as ``--override`` lines, one per point."""
    return "".join(f"{point}={b}\n" for point, b in bits.items())


def read_overrides_file(path: str | Path) -> list[str]:
    """The override lines of a file, each checked: one ``PATTERN=VALUE`` per line (the ``--override`` forms); blank
    lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise VitqError(f"cannot read overrides file {path}: {err}") from None
    overrides = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text and not text.startswith("#"):
            try:
                PointOverride.parse(text)
            except VitqError as err:
                raise VitqError(f"{path}:{number}: {err}") from None
            overrides.append(text)
    return overrides


__all__ = ["BUDGET_KINDS", "DEFAULT_MENU", "Budget", "allocate", "bit_sensitivities", "check_menu",
           "overrides_text", "point_sizes", "read_overrides_file"]
