"""AdaLog's Fast Progressive Combining Search (FPCS) of uniform (scale, zero point) pairs (docs/methods/adalog.md).

For a Linear ``y = x·Wᵀ + b`` whose weight quantizer (per output row) and input quantizer (per tensor) are
uniform affine, FPCS chooses their steps and zero points by the layer's **output** error

    err = ‖x·Wᵀ − Q_a(x)·Q_w(W)ᵀ‖²            (the bias cancels; x as the quantized upstream delivers it)

instead of each quantizer's own error ‖x − Q(x)‖². The search, per quantizer:

1. a grid of ``candidates`` pairs: ``zero_points`` integers around the middle code ``q_min + 2^(b−1)`` times
   equally spaced steps Δ from ``(q(0.9) − q(0.1))/(2^b − 1)`` to ``(max − min)/(2^b − 1)`` (``q`` = quantiles
   of the row, or of the whole tensor);
2. keep the ``width`` best, then ``steps − 1`` times: around each survivor try ``candidates / width`` new steps
   at offsets ``(linspace(0, 1) − ½)·δ`` (δ the previous spacing, divided by ``candidates/width − ½`` each
   time), same zero point, and keep the ``width`` best of survivors and newcomers (AdaLog keeps only the
   newcomers; keeping the survivors too makes the search monotone: it never ends worse than its first grid);
3. weights and input alternate for ``rounds`` rounds, each search seeing the other quantizer's current choice.

Every output row's weight pair is chosen on its own (row j of ``W`` only changes output column j).

Cost on a CPU. Both errors are computed exactly through Gram matrices rather than one GEMM per candidate:

- weights, with ``x̂ = Q_a(x)``, ``r = (x − x̂)·Wᵀ`` and ``δ_j = w_j − ŵ_j``:
  ``err_j = ‖r_j + x̂·δ_j‖² = ‖r_j‖² + 2·δ_jᵀ(x̂ᵀr_j) + δ_jᵀ(x̂ᵀx̂)δ_j`` — the constant is dropped, so each
  candidate costs ``C_out·C_in²`` instead of ``N·C_in·C_out`` (N = tokens, ~6300 for 32 images);
- input, with ``Ŵ = Q_w(W)``, ``A = x·(W − Ŵ)ᵀ`` and ``E = x − Q_a(x)``:
  ``err = ‖A + E·Ŵᵀ‖² = ‖A‖² + 2⟨A·Ŵ, E⟩ + ⟨E·(ŴᵀŴ), E⟩`` (or ``‖E·Ŵᵀ‖²`` when ``C_out <= C_in``), on every
  ``row_stride``-th token;
- attention operands: the same expansion for ``L·Rᵀ`` per head (:func:`matmul_operand_error`).

The CPU defaults (64 candidates, width 8, 4 steps, 2 rounds, every 4th token for the input) are smaller than
AdaLog's GPU configuration (128, 16, 6, 3, all tokens); the refinement still reaches a spacing of
``δ/7.5³`` of the first grid. The attention searches (q, k, v: two parameters per head) use every
``row_stride``-th image: an A·V error costs ``B·heads·T²·D`` per candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitq.errors import VitqError
from vitq.nn import QLinear
from vitq.quantizers import Quantizer, UniformQuantizer
from vitq.quantizers.uniform import MIN_SCALE, fake_quant

#: ``score(scales, zero_points) -> errors``, all three [rows, candidates]
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: AdaLog's candidate range: the clipping range goes from the (0.1, 0.9) quantiles to (min, max)
INNER_QUANTILE = 0.9
#: at most this many zero points in the first grid (AdaLog)
MAX_ZERO_POINTS = 16
#: candidates scored at once in the weight search (bounds memory: chunk x C_out x C_in floats)
WEIGHT_CHUNK = 16


@dataclass(frozen=True)
class FpcsSettings:
    """Search size (see the module docstring)."""

    candidates: int = 64
    width: int = 8
    steps: int = 4
    rounds: int = 2
    row_stride: int = 4

    def __post_init__(self) -> None:
        for name in ("candidates", "width", "steps", "rounds", "row_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VitqError(f"FPCS {name} must be a positive integer, got {value!r}")
        if self.candidates < 2 * self.width:
            raise VitqError(f"FPCS needs candidates >= 2 x width, got {self.candidates} and {self.width}")

    @property
    def refine_count(self) -> int:
        """New steps tried around each survivor."""
        return self.candidates // self.width


def grid_candidates(rows: torch.Tensor, q_min: int, q_max: int, *, candidates: int,
                    zero_points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdaLog's first grid for each row of ``rows`` ([R, elements]): returns ``scales``, ``zero_points``
    (both [R, K], K = ``zero_points · (candidates // zero_points)``) and the step spacing δ ([R, 1])."""
    levels = q_max - q_min
    n_zp = max(1, min(zero_points, MAX_ZERO_POINTS, levels + 1, candidates // 2))
    n_scale = candidates // n_zp
    x = rows.detach().float()
    quantiles = torch.quantile(x, x.new_tensor([1 - INNER_QUANTILE, INNER_QUANTILE]), dim=1)  # [2, R]
    inner = (quantiles[1] - quantiles[0])[:, None]
    outer = (x.amax(dim=1) - x.amin(dim=1))[:, None]
    spacing = (outer - inner) / max(n_scale - 1, 1) / levels
    scales = (inner / levels + spacing * torch.arange(n_scale, dtype=x.dtype, device=x.device)).clamp_min(MIN_SCALE)
    first_zp = q_min + 2 ** (levels.bit_length() - 1) - n_zp // 2
    zps = torch.arange(first_zp, first_zp + n_zp, dtype=x.dtype, device=x.device).clamp(q_min, q_max)
    return (scales.repeat(1, n_zp), zps.repeat_interleave(n_scale)[None, :].expand(len(x), -1).clone(),
            spacing.clamp_min(MIN_SCALE))


@torch.no_grad()
def progressive_search(score: Score, scales: torch.Tensor, zero_points: torch.Tensor, spacing: torch.Tensor,
                       settings: FpcsSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """FPCS over a first grid (``scales``/``zero_points`` [R, K], ``spacing`` [R, 1]), each row on its own.
    Returns the best ``(scale, zero_point)`` per row ([R] each); ties keep the earlier candidate."""
    errors = score(scales, zero_points)
    n = settings.refine_count
    offsets = torch.linspace(0, 1, n, dtype=scales.dtype, device=scales.device) - 0.5
    for _ in range(settings.steps - 1):
        keep = errors.topk(min(settings.width, errors.shape[1]), dim=1, largest=False, sorted=True).indices
        scales, zero_points, errors = (t.gather(1, keep) for t in (scales, zero_points, errors))
        new_scales = (scales[:, :, None] + offsets * spacing[:, :, None]).reshape(len(scales), -1).clamp_min(MIN_SCALE)
        new_zps = zero_points.repeat_interleave(n, dim=1)
        spacing = spacing / (n - 0.5)
        scales = torch.cat([scales, new_scales], dim=1)
        zero_points = torch.cat([zero_points, new_zps], dim=1)
        errors = torch.cat([errors, score(new_scales, new_zps)], dim=1)
    best = errors.argmin(dim=1, keepdim=True)
    return scales.gather(1, best)[:, 0], zero_points.gather(1, best)[:, 0]


def weight_output_error(x: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor, q_min: int, q_max: int) -> Score:
    """Score of per-row weight candidates: ‖x·w_jᵀ − x̂·ŵ_jᵀ‖² per output row j, up to a per-row constant
    (``x``: [N, C_in] the layer input, ``x_hat`` its quantized value, ``weight``: [C_out, C_in])."""
    w = weight.detach().float()
    gram = x_hat.T @ x_hat  # x̂ᵀx̂, [C_in, C_in]
    cross = (x_hat.T @ ((x - x_hat) @ w.T)).T.contiguous()  # row j: x̂ᵀ r_j, [C_out, C_in]

    def score(scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, scales.shape[1], WEIGHT_CHUNK):
            s = scales[:, start:start + WEIGHT_CHUNK].T[:, :, None]  # [k, C_out, 1]
            z = zero_points[:, start:start + WEIGHT_CHUNK].T[:, :, None]
            delta = fake_quant(w[None], s, z, q_min, q_max).sub_(w).neg_()  # w − ŵ, [k, C_out, C_in]
            err = (2 * (delta * cross).sum(-1, dtype=torch.float64)
                   + ((delta @ gram) * delta).sum(-1, dtype=torch.float64))
            out.append(err.T)
        return torch.cat(out, dim=1)

    return score


def input_output_error(x: torch.Tensor, weight: torch.Tensor, weight_hat: torch.Tensor, q_min: int,
                       q_max: int) -> Score:
    """Score of per-tensor input candidates ([1, K]): ‖x·Wᵀ − Q(x)·Ŵᵀ‖² up to a constant."""
    w, w_hat = weight.detach().float(), weight_hat.detach().float()
    linear_term = (x @ (w - w_hat).T) @ w_hat  # A·Ŵ, [N, C_in]
    c_out, c_in = w.shape
    gram = w_hat.T @ w_hat if c_in < c_out else None  # ŴᵀŴ

    def quadratic(e: torch.Tensor) -> torch.Tensor:  # ‖E·Ŵᵀ‖²
        if gram is None:
            return (e @ w_hat.T).square().sum(dtype=torch.float64)
        return ((e @ gram) * e).sum(dtype=torch.float64)

    def score(scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
        errors = []
        for s, z in zip(scales[0], zero_points[0], strict=True):  # 0-d views on the device: no transfer
            e = fake_quant(x, s, z, q_min, q_max).sub_(x).neg_()  # x − Q(x)
            errors.append(2 * (linear_term * e).sum(dtype=torch.float64) + quadratic(e))
        return torch.stack(errors)[None, :]

    return score


def _searchable(quantizer: Quantizer | None, *, tensor: bool, channel_axis: int | None) -> bool:
    """An enabled uniform asymmetric quantizer, per tensor (if ``tensor``) or per channel along ``channel_axis``."""
    if type(quantizer) is not UniformQuantizer or not quantizer.enabled or quantizer.symmetric:
        return False
    if quantizer.granularity == "tensor":
        return tensor
    return quantizer.granularity == "channel" and quantizer.axis == channel_axis


def _fake_quant(quantizer: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None or not quantizer.enabled else quantizer.quantize_dequantize(x)


def _install(quantizer: UniformQuantizer, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """Install a search's ``(scale, zero_point)`` in the quantizer's own dtypes."""
    quantizer.set_params({"scale": scale.to(quantizer.scale.dtype),
                          "zero_point": zero_point.to(quantizer.zero_point.dtype)})


@torch.no_grad()
def fpcs_linear(linear: QLinear, x: torch.Tensor, settings: FpcsSettings = FpcsSettings()) -> None:
    """Search ``linear``'s uniform weight (per row) and input (per tensor) quantizers by its output error on
    input ``x`` (its calibration input, upstream quantized). A quantizer of another kind or granularity is
    kept as it is and only enters the other quantizer's error; both must already be calibrated."""
    wq, aq = linear.weight_quantizer, linear.input_quantizer
    search_w = _searchable(wq, tensor=False, channel_axis=0)  # per output row
    search_a = _searchable(aq, tensor=True, channel_axis=None)
    if not (search_w or search_a):
        return
    x = x.detach().float().reshape(-1, x.shape[-1])
    weight = linear.weight.detach().float()
    x_rows = x[::settings.row_stride].contiguous()
    # AdaLog's zero points: min(16, 2^(b−1)) around the middle for weights, min(16, 2^b) for the input
    w_grid = grid_candidates(weight, wq.q_min, wq.q_max, candidates=settings.candidates,
                             zero_points=2 ** (wq.bits - 1)) if search_w else None
    a_grid = grid_candidates(x_rows.reshape(1, -1), aq.q_min, aq.q_max, candidates=settings.candidates,
                             zero_points=2 ** aq.bits) if search_a else None
    for _ in range(settings.rounds):
        if search_w:
            score = weight_output_error(x, _fake_quant(aq, x), weight, wq.q_min, wq.q_max)
            _install(wq, *progressive_search(score, *w_grid, settings))
        if search_a:
            score = input_output_error(x_rows, weight, _fake_quant(wq, weight), aq.q_min, aq.q_max)
            _install(aq, *progressive_search(score, *a_grid, settings))


def matmul_operand_error(left: torch.Tensor, right: torch.Tensor, right_hat: torch.Tensor,
                         quantizer: UniformQuantizer) -> Score:
    """Score of ``quantizer``'s candidates (one row per head, or one row) for the left operand of ``L·Rᵀ``
    ([B, heads, T, D] @ [B, heads, D, T']): ‖L·Rᵀ − Q(L)·R̂ᵀ‖² per head, up to a constant. As for weights, with
    ``Δ = L − Q(L)`` and ``C = L·(R − R̂)ᵀ``: ``‖C + Δ·R̂ᵀ‖² = ‖C‖² + 2⟨Δ, C·R̂⟩ + ⟨Δ·(R̂ᵀR̂), Δ⟩``."""
    gram = right_hat.transpose(-1, -2) @ right_hat  # R̂ᵀR̂, [B, heads, D, D]
    cross = (left @ (right - right_hat).transpose(-1, -2)) @ right_hat  # C·R̂, like ``left``

    def score(scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
        errors = []
        for s, z in zip(scales.T, zero_points.T, strict=True):
            delta = fake_quant(left, quantizer.broadcast(s, left), quantizer.broadcast(z, left), quantizer.q_min,
                               quantizer.q_max).sub_(left).neg_()  # L − Q(L)
            terms = 2 * delta * cross + (delta @ gram) * delta
            errors.append(quantizer.group_rows(terms).sum(1, dtype=torch.float64))
        return torch.stack(errors, dim=1)

    return score


def _searchable_operand(quantizer: Quantizer | None) -> bool:
    """An attention operand [B, heads, T, D] quantizer FPCS searches: per tensor or per head (axis 1)."""
    return _searchable(quantizer, tensor=True, channel_axis=1)


def _search_operand(quantizer: UniformQuantizer, left: torch.Tensor, right: torch.Tensor, right_hat: torch.Tensor,
                    settings: FpcsSettings) -> None:
    grid = grid_candidates(quantizer.group_rows(left), quantizer.q_min, quantizer.q_max,
                           candidates=settings.candidates, zero_points=2 ** quantizer.bits)
    _install(quantizer, *progressive_search(matmul_operand_error(left, right, right_hat, quantizer), *grid, settings))


@torch.no_grad()
def fpcs_query_key(q: torch.Tensor, k: torch.Tensor, q_quantizer: Quantizer | None, k_quantizer: Quantizer | None,
                   settings: FpcsSettings = FpcsSettings()) -> None:
    """Search the q and k quantizers (uniform, per head or per tensor; others are left alone) by the logits
    error ‖q·kᵀ − Q(q)·Q(k)ᵀ‖², alternating for ``settings.rounds`` (q, k: [B, heads, T, D], unquantized), on every
    ``row_stride``-th image (windows, for Swin)."""
    q, k = q[::settings.row_stride], k[::settings.row_stride]
    for _ in range(settings.rounds):
        if _searchable_operand(q_quantizer):
            _search_operand(q_quantizer, q, k, _fake_quant(k_quantizer, k), settings)
        if _searchable_operand(k_quantizer):
            _search_operand(k_quantizer, k, q, _fake_quant(q_quantizer, q), settings)


@torch.no_grad()
def fpcs_value(v: torch.Tensor, attn: torch.Tensor, v_quantizer: Quantizer | None, attn_quantizer: Quantizer | None,
               settings: FpcsSettings = FpcsSettings(),
               value_weights: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Search the v quantizer by the attention-output error ‖A·v − Q(A)·Q(v)‖² (``A``: the attention map
    [B, heads, T, T'], ``v``: [B, heads, T', D], both unquantized), as ‖vᵀ·Aᵀ − Q(v)ᵀ·Q(A)ᵀ‖², on every
    ``row_stride``-th image. ``value_weights`` (the attention module's, e.g. talking heads' ``proj_w`` head mix)
    maps ``A`` and ``Q(A)`` to the weights that multiply ``v``; ``None``: the identity."""
    if _searchable_operand(v_quantizer):
        v, attn = v[::settings.row_stride], attn[::settings.row_stride]
        attn_hat = _fake_quant(attn_quantizer, attn)
        if value_weights is not None:
            attn, attn_hat = value_weights(attn), value_weights(attn_hat)
        _search_operand(v_quantizer, v.transpose(-1, -2), attn, attn_hat, settings)


class _Stop(Exception):
    """Ends a partial forward pass once its search is done."""


@torch.no_grad()
def fpcs_stage(qmodel, stage, x: torch.Tensor, settings: FpcsSettings = FpcsSettings()) -> None:
    """FPCS of every Linear (:func:`fpcs_linear`) and attention (q, k by the logits: :func:`fpcs_query_key`;
    v by the attention output: :func:`fpcs_value`) of ``stage`` on its calibration input ``x``.

    Each search must see its inputs as the model computes them *after* every upstream search, so the stage runs
    once per search: a pass stops right after the first not-yet-searched point it reaches has been searched,
    and the next pass starts again from ``x``. Searches thus happen in forward order, each on exact inputs."""
    linears = [m for name, m in qmodel.points().items() if isinstance(m, QLinear) and stage.contains(name)]
    attentions = qmodel.attention_modules(stage)
    raw: dict[tuple[int, str], torch.Tensor] = {}

    def keep_input(key):
        def hook(_module, args):
            raw[key] = args[0]
        return hook

    # (module whose input triggers the search, search on that input)
    pending = [(linear, lambda inp, linear=linear: fpcs_linear(linear, inp, settings)) for linear in linears]
    # separable attention (MobileViT v2) has no q·kᵀ product: no q and k points to search
    scored = [getattr(attn, "q", None) is not None and getattr(attn, "k", None) is not None for attn in attentions]
    for i, attn in enumerate(attentions):
        if scored[i]:
            pending.append((attn.k, lambda k, i=i, attn=attn: fpcs_query_key(raw[i, "q"], k, attn.q.quantizer,
                                                                              attn.k.quantizer, settings)))
        pending.append((attn.softmax, lambda a, i=i, attn=attn: fpcs_value(raw[i, "v"], a, attn.v.quantizer,
                                                                            attn.softmax.quantizer, settings,
                                                                            attn.value_weights)))
    captures = [(attn.q, (i, "q")) for i, attn in enumerate(attentions) if scored[i]] + \
               [(attn.v, (i, "v")) for i, attn in enumerate(attentions)]
    fired: list[int] = []

    def trigger(index):
        def hook(_module, args):
            pending[index][1](args[0])
            fired.append(index)
            raise _Stop
        return hook

    while pending:
        fired.clear()
        hooks = [module.register_forward_pre_hook(keep_input(key)) for module, key in captures]
        hooks += [module.register_forward_pre_hook(trigger(index)) for index, (module, _) in enumerate(pending)]
        try:
            stage.run(x)
        except _Stop:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        if not fired:  # the rest is never reached (e.g. a disabled branch)
            return
        del pending[fired[0]]


@torch.no_grad()
def output_mse(linear: QLinear, x: torch.Tensor) -> float:
    """‖x·Wᵀ − Q_a(x)·Q_w(W)ᵀ‖² / ‖x·Wᵀ‖² of a calibrated Linear on input ``x`` (for reports and tests)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    ref = F.linear(x, linear.weight)
    out = linear(x) - (0 if linear.bias is None else linear.bias)
    return float((out - ref).double().square().sum() / ref.double().square().sum())
