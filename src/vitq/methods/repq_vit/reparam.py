"""RepQ-ViT's scale reparameterization of post-LayerNorm activations (docs/methods/repq-vit.md,
docs/protocol.md#target-cancellation, docs/protocol.md#constant-layernorm-channels).

Shared by the methods that quantize the post-LayerNorm activations per channel at calibration and
per tensor at inference (``repq-vit``, ``dopq-vit``). Nothing here is method specific: the target
scale (mean = RepQ-ViT, median = DopQ-ViT's MOSF, a searched one = SOSF) and the ratio bound are
options, and a search plugs in through ``target_search``.

The fold (docs/methods/repq-vit.md#post-layernorm-scale-reparameterization). A LayerNorm output ``X`` (tokens × C) feeds
a Linear ``y = W X + β``. Its per-channel quantizer has steps ``s ∈ R^C`` and zero points ``z ∈ R^C`` (codes
``q_min..q_max``). For a per-tensor target ``(s̃, z̃)``::

    r_c = s_c / s̃                                   ratio, shape [C]
    min_c = (q_min − z_c)·s_c ;  miñ = (q_min − z̃)·s̃    lowest grid value of channel c / of the target
    b_c = min_c / r_c − miñ = s̃·(z̃ − z_c)            shift, shape [C]
    X'  = X / r − b          γ ← γ / r ;  β_LN ← β_LN / r − b        (the LayerNorm now outputs X')
    W'  = W · diag(r) ;  β' = β + W'·b                                  (so W' X' + β' = W X + β exactly)

Then ``X'_c / s̃ + z̃ = X_c / s_c + z_c``: per-tensor quantization of ``X'`` with ``(s̃, z̃)`` gives the
same integer codes as per-channel quantization of ``X`` with ``(s, z)`` whenever ``z̃`` is an integer
(RepQ-ViT keeps ``z̃ = mean(z)`` unrounded, which shifts every code by ``frac(z̃)``; ``round_zero_point``
rounds it, as AdaLog does).

The target scale cancels (docs/protocol.md#target-cancellation). Replacing ``s̃`` by ``k·s̃`` gives ``r/k``,
``k·b``, ``k·X'`` and ``W'/k``: per-tensor activation and per-row weight quantization are both equivariant to the common
factor, so the quantized output does not change. Only a *bounded* fold makes the target matter:
with ``ratio_bound = ρ`` the folded ratio is ``r_c = clamp(s_c / s̃, 1/ρ, ρ)``, so channels whose
scale is far from the target (outliers) are only partly folded; the per-tensor quantizer then clips
or coarsens those few channels while every weight row keeps its resolution. A bounded channel's
grid cannot line up with the target's, so its shift centres its calibrated range on the target
range instead (centre ``m_c = (q_mid − z_c)·s_c``, ``m̃ = (q_mid − z̃)·s̃``, ``q_mid = (q_min + q_max)/2``)::

    b_c = m_c / r_c − m̃ = s̃·(z̃ − z_c) + (s_c / r_c − s̃)·(q_mid − z_c)

which is the formula above for an unbounded channel (``s_c / r_c = s̃``). Any ``(r, b)`` keeps the
float function exactly; the choice only decides how the quantization grid falls.

Degenerate channels (docs/protocol.md#constant-layernorm-channels): a constant channel (LayerNorm weight exactly 0, e.g.
a checkpoint rounded to fixed point) or a dead one has an empty calibrated range: a tiny step and possibly a
huge or non-finite zero point. One such channel in ``mean(z)`` ruins the target and collapses even a
W8A8 model. Channels with a non-finite step or zero point, a step ``s_c <= degenerate_rel ·
median(s)`` (median over the channels with a finite positive step), or a LayerNorm weight of exactly
0 are excluded from every statistic over channels and left unfolded (``r_c = 1, b_c = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib.runner import calibrating, run_stagewise
from vitq.errors import VitqError
from vitq.models import Stage
from vitq.nn import QLinear
from vitq.quantizers import Quantizer, UniformQuantizer, build_quantizer

#: a channel whose step is at most this fraction of the median step is degenerate
#: (docs/protocol.md#constant-layernorm-channels)
DEGENERATE_REL = 1e-6
TARGETS = ("mean", "median")

Target = str | tuple[torch.Tensor | float, torch.Tensor | float]


@dataclass(frozen=True)
class FoldResult:
    """What a fold did. Tensors are float64 (``degenerate``/``bounded``: bool).

    ``scale``/``zero_point`` (0-d) are the per-tensor target ``(s̃, z̃)`` for the linear's input
    quantizer; their values are exactly representable in the quantizer's dtype (float32 for a float32
    model), so the installed quantizer uses the very numbers the fold was computed with.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    ratio: torch.Tensor  # r, [C]
    shift: torch.Tensor  # b, [C]
    degenerate: torch.Tensor  # channels left unfolded (docs/protocol.md#constant-layernorm-channels), [C]
    bounded: torch.Tensor  # channels whose ratio s_c/s̃ was clamped to [1/ρ, ρ], [C]

    def target_params(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``(s̃, z̃)`` as the parameters of a per-tensor quantizer of ``dtype``."""
        return {"scale": self.scale.to(dtype).reshape(1), "zero_point": self.zero_point.to(dtype).reshape(1)}

    @property
    def num_degenerate(self) -> int:
        return int(self.degenerate.sum())

    @property
    def num_bounded(self) -> int:
        return int(self.bounded.sum())


# ---------------------------------------------------------------------------------------------- pure math
def degenerate_channels(scale: torch.Tensor, zero_point: torch.Tensor, norm_weight: torch.Tensor | None = None,
                        *, rel: float = DEGENERATE_REL) -> torch.Tensor:
    """Bool mask [C] of the channels to exclude from the fold (module docstring,
    docs/protocol.md#constant-layernorm-channels):
    ``s_c`` or ``z_c`` not finite, ``s_c <= rel · median{s_k : s_k finite and > 0}``, or a LayerNorm
    weight of exactly 0 (the channel is the constant ``β_c`` whatever the input)."""
    scale, zero_point = scale.detach().double().reshape(-1), zero_point.detach().double().reshape(-1)
    bad = ~torch.isfinite(scale) | ~torch.isfinite(zero_point) | (scale <= 0)
    usable = scale[~bad]
    if usable.numel():
        bad |= scale <= rel * torch.quantile(usable, 0.5)
    if norm_weight is not None:
        bad |= norm_weight.detach().reshape(-1).to(bad.device) == 0
    return bad


def fold_target(scale: torch.Tensor, zero_point: torch.Tensor, degenerate: torch.Tensor, target: Target = "mean",
                *, round_zero_point: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor target ``(s̃, z̃)`` (float64, 0-d) over the non-degenerate channels.

    ``"mean"``: RepQ-ViT, ``s̃ = mean(s)``, ``z̃ = mean(z)``; ``"median"``: MOSF, ``s̃ = median(s)``,
    ``z̃ = median(z)`` (the midpoint of the two middle values for an even count); or an explicit
    ``(s̃, z̃)`` (SOSF). ``round_zero_point`` rounds ``z̃`` to an integer (half to even).
    """
    valid = ~degenerate
    if not bool(valid.any()):
        raise VitqError("cannot reparameterize: every channel is degenerate (constant or empty range)")
    s, z = scale.detach().double().reshape(-1)[valid], zero_point.detach().double().reshape(-1)[valid]
    if isinstance(target, str):
        if target == "mean":
            s_t, z_t = s.mean(), z.mean()
        elif target == "median":
            s_t, z_t = torch.quantile(s, 0.5), torch.quantile(z, 0.5)
        else:
            raise VitqError(f"reparameterization target must be one of {TARGETS} or a (scale, zero_point) pair, "
                            f"got {target!r}")
    else:
        try:
            s_t, z_t = target
        except (TypeError, ValueError):
            raise VitqError(f"an explicit target must be a (scale, zero_point) pair, got {target!r}") from None
        s_t = torch.as_tensor(s_t, dtype=torch.float64, device=s.device).reshape(())
        z_t = torch.as_tensor(z_t, dtype=torch.float64, device=s.device).reshape(())
    if not (math.isfinite(float(s_t)) and float(s_t) > 0 and math.isfinite(float(z_t))):
        raise VitqError(f"bad reparameterization target: scale={float(s_t)}, zero_point={float(z_t)}")
    if round_zero_point:
        z_t = torch.round(z_t)
    return s_t, z_t


def fold_parameters(scale: torch.Tensor, zero_point: torch.Tensor, *, target: Target = "mean",
                    ratio_bound: float | None = None, round_zero_point: bool = False,
                    code_range: tuple[int, int] = (0, 255), norm_weight: torch.Tensor | None = None,
                    degenerate_rel: float = DEGENERATE_REL, qparam_dtype: torch.dtype = torch.float32) -> FoldResult:
    """The fold's ``(s̃, z̃, r, b)`` from per-channel ``(s, z)``, without touching any module (module
    docstring). ``code_range`` = ``(q_min, q_max)`` of the quantizer; it only matters for bounded
    channels. ``(s̃, z̃)`` are rounded to ``qparam_dtype`` first (the dtype they will be stored in)."""
    if ratio_bound is not None and not (math.isfinite(ratio_bound) and ratio_bound >= 1.0):
        raise VitqError(f"ratio_bound must be a finite number >= 1 (or None), got {ratio_bound!r}")
    s = scale.detach().double().reshape(-1)
    z = zero_point.detach().double().reshape(-1)
    if s.shape != z.shape:
        raise VitqError(f"scale and zero point shapes differ: {tuple(s.shape)} vs {tuple(z.shape)}")
    degenerate = degenerate_channels(s, z, norm_weight, rel=degenerate_rel)
    s_t, z_t = fold_target(s, z, degenerate, target, round_zero_point=round_zero_point)
    s_t, z_t = s_t.to(qparam_dtype).double(), z_t.to(qparam_dtype).double()

    # degenerate channels get a harmless placeholder (s̃, z̃) so that no NaN/inf is ever computed
    s = torch.where(degenerate, s_t, s)
    z = torch.where(degenerate, z_t, z)
    exact = s / s_t  # r_c = s_c / s̃
    if ratio_bound is None:
        ratio, bounded = exact, torch.zeros_like(degenerate)
    else:
        ratio = exact.clamp(1.0 / ratio_bound, ratio_bound)
        bounded = (ratio != exact) & ~degenerate
    # b_c = min_c/r_c − miñ = s̃(z̃ − z_c) for an unbounded channel; a bounded one is centred instead
    shift = s_t * (z_t - z)
    q_mid = (code_range[0] + code_range[1]) / 2
    shift = torch.where(bounded, shift + (s / ratio - s_t) * (q_mid - z), shift)
    ratio = torch.where(degenerate, torch.ones_like(ratio), ratio)
    shift = torch.where(degenerate, torch.zeros_like(shift), shift)
    return FoldResult(s_t, z_t, ratio, shift, degenerate, bounded)


@torch.no_grad()
def apply_fold(norm: nn.LayerNorm, linear: nn.Module, ratio: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold ``X' = X/r − b`` into ``norm`` and compensate in ``linear`` (in place, float64 math).

    ``γ ← γ/r``, ``β_LN ← β_LN/r − b``, ``W ← W·diag(r)``, ``β ← β + W·diag(r)·b`` (a bias is created
    when the linear has none, e.g. Swin's ``reduction``)."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        raise VitqError(f"can only fold into an affine nn.LayerNorm, got {type(norm).__name__}")
    channels = norm.weight.numel()
    if norm.weight.dim() != 1 or linear.weight.dim() != 2 or linear.weight.shape[1] != channels:
        raise VitqError(f"LayerNorm of {channels} channels does not feed a Linear with weight "
                        f"{tuple(linear.weight.shape)}")
    r = ratio.detach().double().reshape(-1).to(norm.weight.device)
    b = shift.detach().double().reshape(-1).to(norm.weight.device)
    if r.numel() != channels or b.numel() != channels:
        raise VitqError(f"fold of {r.numel()} channels for a LayerNorm of {channels}")
    if not (torch.isfinite(r).all() and torch.isfinite(b).all() and (r > 0).all()):
        raise VitqError("refusing to fold non-finite or non-positive ratios / shifts")
    gamma, beta = norm.weight.double(), norm.bias.double()
    weight = linear.weight.double() * r  # W' = W·diag(r): column c scaled by r_c
    bias_shift = weight @ b  # W'·b
    norm.weight.copy_(gamma / r)
    norm.bias.copy_(beta / r - b)
    linear.weight.copy_(weight)
    if linear.bias is None:
        linear.bias = nn.Parameter(bias_shift.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
    else:
        linear.bias.copy_(linear.bias.double() + bias_shift)


def fold_channel_scales(norm: nn.LayerNorm, linear: QLinear, scale: torch.Tensor, zero_point: torch.Tensor, *,
                        target: Target = "mean", ratio_bound: float | None = None, round_zero_point: bool = False,
                        code_range: tuple[int, int] | None = None,
                        degenerate_rel: float = DEGENERATE_REL) -> FoldResult:
    """Fold the per-channel activation quantization ``(s, z)`` of ``norm``'s output into ``norm`` and
    ``linear`` (in place) and return the per-tensor ``(s̃, z̃)`` for ``linear``'s input quantizer.

    ``target``: ``"mean"`` (RepQ-ViT), ``"median"`` (MOSF) or an explicit ``(s̃, z̃)`` (SOSF).
    ``ratio_bound``: fold only ``clamp(s/s̃, 1/ρ, ρ)`` (docs/protocol.md#target-cancellation). ``round_zero_point``:
    integer ``z̃``.
    ``code_range``: ``(q_min, q_max)``; default: the linear's current input quantizer's, else 8-bit
    unsigned (only bounded channels depend on it). Degenerate channels are left unfolded (§7).

    This does not touch the quantizers: install ``(s̃, z̃)`` and re-calibrate the weight quantizer on
    the new weight (as :func:`reparameterize_stage` does).
    """
    if code_range is None:
        current = getattr(linear, "input_quantizer", None)
        code_range = (current.q_min, current.q_max) if isinstance(current, UniformQuantizer) else (0, 255)
    qparam_dtype = torch.promote_types(norm.weight.dtype, torch.float32)
    result = fold_parameters(scale, zero_point, target=target, ratio_bound=ratio_bound,
                             round_zero_point=round_zero_point, code_range=code_range, norm_weight=norm.weight,
                             degenerate_rel=degenerate_rel, qparam_dtype=qparam_dtype)
    apply_fold(norm, linear, result.ratio, result.shift)
    return result


# ---------------------------------------------------------------------------------------------- pipeline
@dataclass
class PairContext:
    """Everything a target search (SOSF) needs for one LayerNorm → Linear pair, before the fold.

    ``inputs`` are the linear's inputs on the calibration batch (before its input quantizer, i.e. the
    float LayerNorm output with upstream quantization), flattened to [tokens, C]; ``scale`` and
    ``zero_point`` the calibrated per-channel parameters; ``options`` the fold options of the call
    (``ratio_bound``, ``round_zero_point``, ``degenerate_rel``). Nothing is modified by
    :meth:`fold` or :meth:`output_error`.
    """

    norm_name: str
    linear_name: str
    norm: nn.LayerNorm
    linear: QLinear
    inputs: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    input_spec: dict[str, Any]
    code_range: tuple[int, int]
    options: dict[str, Any] = field(default_factory=dict)
    _reference: torch.Tensor | None = field(default=None, init=False, repr=False)
    #: output_error by fold parameters: different targets often give the very same fold (e.g. a ratio
    #: bound that clamps no channel), whose error is then not recomputed
    _errors: dict[tuple, float] = field(default_factory=dict, init=False, repr=False)

    @property
    def degenerate(self) -> torch.Tensor:
        return degenerate_channels(self.scale, self.zero_point, self.norm.weight,
                                   rel=self.options.get("degenerate_rel", DEGENERATE_REL))

    def fold(self, target: Target, **overrides: Any) -> FoldResult:
        """The fold parameters for ``target`` (options of the call, updated by ``overrides``)."""
        options = {**self.options, **overrides}
        return fold_parameters(self.scale, self.zero_point, target=target, code_range=self.code_range,
                               norm_weight=self.norm.weight,
                               qparam_dtype=torch.promote_types(self.norm.weight.dtype, torch.float32), **options)

    def reference_output(self) -> torch.Tensor:
        """The float output ``W X + β`` of the unfolded linear on ``inputs``."""
        if self._reference is None:
            self._reference = F.linear(self.inputs, self.linear.weight.detach(), _detached(self.linear.bias))
        return self._reference

    @torch.no_grad()
    def quantized_output(self, target: Target, **overrides: Any) -> torch.Tensor:
        """``Q(W') Q(X') + β'`` after a trial fold with ``target``: per-tensor ``(s̃, z̃)`` on ``X' = X/r − b``
        and the linear's weight quantizer kind re-calibrated on ``W' = W·diag(r)``."""
        return self._quantized_output(self.fold(target, **overrides))

    def _quantized_output(self, result: FoldResult) -> torch.Tensor:
        dtype = self.inputs.dtype
        r, b = result.ratio.to(dtype), result.shift.to(dtype)
        weight = self.linear.weight.detach() * r
        bias = weight @ b if self.linear.bias is None else self.linear.bias.detach() + weight @ b
        act = build_quantizer(self.input_spec)
        act.set_params(result.target_params(dtype))
        x = act((self.inputs / r).sub_(b))  # X' = X/r − b, in place on the one fresh tensor
        wq = self.linear.weight_quantizer
        if wq is not None and wq.enabled:
            trial = build_quantizer(wq.spec())
            trial.calibrate(weight)
            weight = trial(weight)
        return F.linear(x, weight, bias)

    def output_error(self, target: Target, **overrides: Any) -> float:
        """Mean squared error of :meth:`quantized_output` against the float output: the SOSF criterion."""
        result = self.fold(target, **overrides)
        # everything the quantized output depends on (the fold's other fields only describe it)
        key = tuple(t.detach().cpu().numpy().tobytes() for t in (result.scale, result.zero_point, result.ratio,
                                                                  result.shift))
        if key not in self._errors:
            # in place on the fresh quantized output: same values as (q − ref).square().mean()
            self._errors[key] = float(self._quantized_output(result).sub_(self.reference_output()).square_().mean())
        return self._errors[key]


#: ``target_search(ctx)`` returns ``(s̃, z̃)``, or ``(s̃, z̃, ratio_bound)`` to also choose the bound
TargetSearch = Callable[[PairContext], Sequence[Any]]


@dataclass(frozen=True)
class PairFold:
    """One fold done by :func:`reparameterize_stage`."""

    norm: str
    linear: str
    result: FoldResult
    ratio_bound: float | None


@dataclass
class _Plan:
    norm_name: str
    linear_name: str
    norm: nn.LayerNorm
    linear: QLinear
    original: UniformQuantizer
    per_channel: UniformQuantizer
    inputs: list[torch.Tensor] = field(default_factory=list)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def stage_pairs(qmodel, stage: Stage) -> list[tuple[str, str]]:
    """The ``(layernorm, linear)`` pairs of ``qmodel`` whose linear belongs to ``stage``."""
    return [(n, lin) for n, lin in qmodel.norm_linear_pairs() if stage.contains(lin)]


def _plan(qmodel, norm_name: str, linear_name: str) -> _Plan | None:
    norm, linear = qmodel.model.get_submodule(norm_name), qmodel.model.get_submodule(linear_name)
    if not isinstance(linear, QLinear):
        raise VitqError(f"{linear_name} is not a quantized Linear ({type(linear).__name__})")
    quantizer = linear.input_quantizer
    if quantizer is None:
        return None  # a float input (e.g. an override keeps it float): nothing to reparameterize
    if not isinstance(quantizer, UniformQuantizer) or quantizer.granularity != "tensor":
        raise VitqError(f"{linear_name}.input_quantizer must be a per-tensor uniform quantizer to be "
                        f"reparameterized, got {quantizer.spec()}")
    return _Plan(norm_name, linear_name, norm, linear, quantizer, per_channel_twin(quantizer))


def per_channel_twin(quantizer: Quantizer) -> Quantizer:
    """An uncalibrated copy of a post-LayerNorm input quantizer, per channel (last axis) instead of per tensor."""
    twin = build_quantizer({**quantizer.spec(), "granularity": "channel", "axis": -1})
    twin.enabled = quantizer.enabled
    return twin


@torch.no_grad()
def reparameterize_stage(qmodel, stage: Stage, x: torch.Tensor, *, target: Target = "mean",
                         ratio_bound: float | None = None, round_zero_point: bool = False,
                         degenerate_rel: float = DEGENERATE_REL, target_search: TargetSearch | None = None,
                         recalibrate_input: bool = False) -> list[PairFold]:
    """Calibrate one stage the RepQ-ViT way (docs/methods/repq-vit.md#calibration-pipeline) on its calibration input
    ``x``.

    1. each post-LayerNorm input quantizer of the stage (the ``input_quantizer`` of the linear of every
       :meth:`~vitq.quantized_model.QuantizedModel.norm_linear_pairs` pair in the stage) is replaced by
       a per-channel (axis −1) twin of the same spec;
    2. every quantizer of the stage calibrates in forward order on ``x`` (one pass);
    3. each pair is folded (:func:`fold_channel_scales`) with ``target`` — or, with ``target_search``,
       the ``(s̃, z̃[, ratio_bound])`` it returns for the pair's :class:`PairContext`;
    4. the linear gets back a per-tensor quantizer of the declared spec holding ``(s̃, z̃)`` — or, with
       ``recalibrate_input``, calibrated by its own init on the folded inputs ``X/r − b`` (for a bounded
       fold: the grid then covers the partly folded outlier channels instead of clipping them; for an
       unbounded fold it gives up the exact per-channel equivalence) — and its weight quantizer is
       re-calibrated on the folded weight. The other quantizers keep their calibration (as in RepQ-ViT).

    A stage without pairs is simply calibrated in forward order, so a method can call this for every
    stage (see :func:`reparameterize_model`). Returns the folds done. A model quantized for a deployment target
    (``config.deploy``, :mod:`vitq.targets`) always rounds ``z̃``.
    """
    round_zero_point = round_zero_point or qmodel.config.deploy is not None  # runtimes take integer zero points
    plans = [p for p in (_plan(qmodel, n, lin) for n, lin in stage_pairs(qmodel, stage)) if p is not None]
    for plan in plans:
        plan.linear.input_quantizer = plan.per_channel
    hooks = []
    if target_search is not None or recalibrate_input:
        for plan in plans:
            def capture(module, args, plan=plan):
                plan.inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
            hooks.append(plan.linear.register_forward_pre_hook(capture))
    try:
        with calibrating(qmodel.stage_quantizers(stage)):
            stage.run(x)
    except BaseException:
        for plan in plans:
            plan.linear.input_quantizer = plan.original
        raise
    finally:
        for hook in hooks:
            hook.remove()

    folds = []
    for plan in plans:
        pc = plan.per_channel
        if not pc.is_calibrated:  # disabled quantizer: it saw nothing, leave the pair as it was
            plan.linear.input_quantizer = plan.original
            continue
        spec = plan.original.spec()
        inputs = torch.cat(plan.inputs).float() if plan.inputs else None
        pair_target, pair_bound = target, ratio_bound
        if target_search is not None:
            ctx = PairContext(plan.norm_name, plan.linear_name, plan.norm, plan.linear,
                              inputs, pc.scale, pc.zero_point, spec, (pc.q_min, pc.q_max),
                              {"ratio_bound": ratio_bound, "round_zero_point": round_zero_point,
                               "degenerate_rel": degenerate_rel})
            choice = tuple(target_search(ctx))
            if len(choice) not in (2, 3):
                raise VitqError(f"target_search must return (scale, zero_point[, ratio_bound]), got {choice!r}")
            pair_target = choice[:2]
            if len(choice) == 3:
                pair_bound = choice[2]
        result = fold_channel_scales(plan.norm, plan.linear, pc.scale, pc.zero_point, target=pair_target,
                                     ratio_bound=pair_bound, round_zero_point=round_zero_point,
                                     code_range=(pc.q_min, pc.q_max), degenerate_rel=degenerate_rel)
        quantizer = build_quantizer(spec)
        quantizer.enabled = plan.original.enabled
        if recalibrate_input:
            dtype = inputs.dtype
            quantizer.calibrate(inputs / result.ratio.to(dtype) - result.shift.to(dtype))
        else:
            quantizer.set_params(result.target_params(pc.scale.dtype))
        plan.inputs.clear()
        plan.linear.input_quantizer = quantizer
        recalibrate_weight(plan.linear)
        folds.append(PairFold(plan.norm_name, plan.linear_name, result, pair_bound))
    return folds


def recalibrate_weight(linear: QLinear) -> None:
    """RepQ-ViT's ``weight_quantizer.inited = False`` + one forward: weights calibrate on themselves."""
    quantizer: Quantizer | None = linear.weight_quantizer
    if quantizer is not None and quantizer.enabled:
        quantizer.calibrate(linear.weight.detach())


def reparameterize_model(qmodel, images: torch.Tensor, *, progress: bool = True, batch_size: int = 32,
                         **options: Any) -> list[PairFold]:
    """:func:`reparameterize_stage` on every stage in order, feeding each stage's quantized output on
    (the whole RepQ-ViT calibration). ``options`` go to :func:`reparameterize_stage`."""
    folds: list[PairFold] = []

    def visit(stage: Stage, x: torch.Tensor) -> None:
        folds.extend(reparameterize_stage(qmodel, stage, x, **options))

    run_stagewise(qmodel, images, visit, batch_size=batch_size, progress=progress, desc="reparameterizing")
    return folds
