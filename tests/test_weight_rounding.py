"""GPTQ and ERQ (docs/methods/erq.md, docs/methods/gptq.md): the math against independent references, then end to
end on tiny models."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import randomize_norms
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vitq
from vitq.calib.layer_inputs import gather_input_moments, input_rows, row_grid, set_weight_and_bias
from vitq.config import QuantConfig
from vitq.errors import VitqError
from vitq.methods import method_class
from vitq.methods.erq import aqer_update, calibration_error, refine_rounding, wqer_round
from vitq.methods.gptq import gptq_round
from vitq.nn import QConv2d, QLinear
from vitq.quantizers import build_quantizer

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_problem(out: int = 6, channels: int = 12, rows: int = 80, bits: int = 3, seed: int = 0):
    """A random weight, correlated inputs (as real activations are), and a per-row weight grid."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, channels, generator=gen, dtype=torch.float64)
    mixing = torch.randn(channels, channels, generator=gen, dtype=torch.float64)
    x = torch.randn(rows, channels, generator=gen, dtype=torch.float64) @ mixing + 0.3
    quantizer = build_quantizer({"kind": "uniform", "bits": bits, "granularity": "channel", "axis": 0})
    quantizer.calibrate(weight.float())
    return weight, x, quantizer


def _proxy(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row ``δ H δᵀ``."""
    return ((delta @ h) * delta).sum(dim=1)


# ----------------------------------------------------------------------------------------------- GPTQ
def _gptq_reference(weight, hessian, quantize_column, *, damp, act_order, group_params=None, group_size=None):
    """Optimal Brain Surgeon column by column, re-inverting the free columns' Hessian at every step.

    ``quantize_column(i, column)`` rounds column ``i``; with ``group_params(k, columns)`` (dynamic groups)
    it is called first on the up-to-date columns of group ``k`` when the group's first column is reached.
    """
    w, h = weight.clone(), hessian.clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True).tolist() if act_order \
        else list(range(w.shape[1]))
    for step, i in enumerate(order):
        if group_params is not None and i % group_size == 0:
            group_params(i // group_size, w[:, i:i + group_size])
        free = order[step:]
        h_inv = torch.linalg.inv(h[free][:, free])  # inverse Hessian of the columns not yet rounded
        q = quantize_column(i, w[:, i:i + 1])[:, 0]
        err = (w[:, i] - q) / h_inv[0, 0]
        w[:, free] -= err[:, None] * h_inv[0][None, :]
        w[:, i] = q
    return w


def _per_row(quantizer):
    return lambda i, column: quantizer.quantize_dequantize(column.float()).double()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [128, 5])
def test_gptq_matches_column_by_column_reference(act_order, block_size):
    weight, x, quantizer = _layer_problem()
    hessian = 2 * x.T @ x / x.shape[0]
    grid = row_grid(quantizer, weight.shape[0])
    ours = gptq_round(weight, hessian, grid, damp=0.01, block_size=block_size, act_order=act_order)
    reference = _gptq_reference(weight, hessian, _per_row(quantizer), damp=0.01, act_order=act_order)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # every weight is on the quantizer's grid, and the output error beats round-to-nearest
    torch.testing.assert_close(quantizer(ours.float()).double(), ours, atol=1e-6, rtol=0)
    rtn = quantizer(weight.float()).double()
    assert _proxy(ours - weight, hessian).sum() < _proxy(rtn - weight, hessian).sum()


def test_gptq_static_groups_match_the_reference():
    weight, x, _ = _layer_problem()
    hessian = 2 * x.T @ x / x.shape[0]
    grouped = build_quantizer({"kind": "uniform", "bits": 3, "granularity": "group", "group_size": 4})
    grouped.calibrate(weight.float())
    ours = gptq_round(weight, hessian, None, block_size=5, act_order=True, group_size=4,
                      group_grid=lambda k, columns: row_grid(grouped, weight.shape[0], group=k))

    def quantize_column(i, column):  # the column's group, through the quantizer's own broadcasting
        full = torch.zeros(weight.shape, dtype=torch.float32)
        full[:, i] = column[:, 0].float()
        return grouped.quantize_dequantize(full)[:, i:i + 1].double()

    reference = _gptq_reference(weight, hessian, quantize_column, damp=0.01, act_order=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped(ours.float()).double(), ours, atol=1e-6, rtol=0)


def test_gptq_dynamic_groups_calibrate_each_group_on_its_updated_weights():
    weight, x, _ = _layer_problem()
    hessian = 2 * x.T @ x / x.shape[0]
    spec = {"kind": "uniform", "bits": 3, "granularity": "channel", "axis": 0}
    ours_grids, reference_quantizers = {}, {}

    def group_grid(k, columns):
        q = build_quantizer(spec)
        q.calibrate(columns.float())
        ours_grids[k] = q
        return row_grid(q, weight.shape[0])

    def group_params(k, columns):
        reference_quantizers[k] = build_quantizer(spec)
        reference_quantizers[k].calibrate(columns.float())

    ours = gptq_round(weight, hessian, None, group_size=4, group_grid=group_grid)
    reference = _gptq_reference(weight, hessian, lambda i, col: _per_row(reference_quantizers[i // 4])(i, col),
                                damp=0.01, act_order=False, group_params=group_params, group_size=4)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    for k, q in ours_grids.items():
        torch.testing.assert_close(q.scale, reference_quantizers[k].scale)


def test_gptq_dead_input_is_rounded_without_compensation():
    weight, x, quantizer = _layer_problem()
    x[:, 3] = 0.0
    hessian = 2 * x.T @ x / x.shape[0]
    out = gptq_round(weight, hessian, row_grid(quantizer, weight.shape[0]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3], quantizer(weight.float()).double()[:, 3], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ ERQ
def test_aqer_is_the_ridge_least_squares_solution():
    weight, x, quantizer_w = _layer_problem(out=5, channels=8, rows=60, seed=1)
    act = build_quantizer({"kind": "uniform", "bits": 4})
    act.calibrate(x.float())
    x_q = act(x.float()).double()
    a = torch.cat([x_q, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    b = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    bias = torch.randn(5, dtype=x.dtype)
    w_aug = torch.cat([weight, bias[:, None]], 1)
    moments = _moments(a, b)
    lam = 3.0
    ours = aqer_update(w_aug, moments, lam)
    # independent: min ‖A (W̄+δ)ᵀ − B W̄ᵀ‖² + λ‖δ‖² as one stacked least-squares problem
    stacked = torch.cat([a, lam**0.5 * torch.eye(a.shape[1], dtype=a.dtype)])
    target = torch.cat([b @ w_aug.T - a @ w_aug.T, torch.zeros(a.shape[1], 5, dtype=a.dtype)])
    delta = torch.linalg.lstsq(stacked, target).solution
    torch.testing.assert_close(ours, w_aug + delta.T, atol=1e-8, rtol=1e-8)
    # it lowers the output error caused by the activation quantization
    assert calibration_error(ours, w_aug, moments) < calibration_error(w_aug, w_aug, moments)


def _moments(a: torch.Tensor, b: torch.Tensor):
    from vitq.calib.layer_inputs import InputMoments

    return InputMoments(a.T @ a, a.T @ b, b.T @ b, a.shape[0])


def test_calibration_error_matches_the_direct_sum():
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(40, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    w, ref = (torch.randn(3, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    direct = float((a @ w.T - b @ ref.T).square().sum())
    assert calibration_error(w, ref, _moments(a, b)) == pytest.approx(direct, rel=1e-10)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 7), iterations=st.integers(0, 20))
def test_refine_rounding_only_flips_between_floor_and_ceil_and_never_worsens(seed, k, iterations):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(3 * k, k, generator=gen, dtype=torch.float64)
    h = m.T @ m
    delta = torch.rand(4, k, generator=gen, dtype=torch.float64) - 0.5  # nearest-rounding error
    other = delta - torch.sign(delta)  # the other direction, one step away
    out = refine_rounding(delta, other, h, iterations)
    assert ((out == delta) | (out == other)).all()
    assert (_proxy(out, h) <= _proxy(delta, h) + 1e-12).all()
    if iterations >= k * 4 and k <= 4:  # enough iterations to reach a local optimum: no single flip helps
        for j in range(k):
            flipped = out.clone()
            flipped[:, j] = torch.where(out[:, j] == delta[:, j], other[:, j], delta[:, j])
            assert (_proxy(flipped, h) >= _proxy(out, h) - 1e-12).all()


def test_refine_rounding_reaches_the_brute_force_optimum_on_a_diagonal_proxy():
    # with a diagonal H the rows' entries are independent: the greedy optimum is the exhaustive one
    gen = torch.Generator().manual_seed(5)
    k = 5
    h = torch.diag(torch.rand(k, generator=gen, dtype=torch.float64) + 0.1)
    delta = torch.rand(2, k, generator=gen, dtype=torch.float64) - 0.5
    other = delta - torch.sign(delta)
    out = refine_rounding(delta, other, h, 100)
    for row in range(2):
        best = min(_proxy(torch.tensor([[float(delta[row, j] if c == 0 else other[row, j]) for j, c in
                                          enumerate(choice)]], dtype=torch.float64), h).item()
                   for choice in itertools.product((0, 1), repeat=k))
        assert _proxy(out[row:row + 1], h).item() == pytest.approx(best)


@pytest.mark.parametrize("refine_iters", [0, 100])
def test_wqer_leaves_every_weight_on_the_grid_and_beats_plain_rounding(refine_iters):
    weight, x, quantizer = _layer_problem(out=8, channels=16, rows=120, seed=2)
    bias = torch.randn(8, dtype=torch.float64)
    w_aug = torch.cat([weight, bias[:, None]], 1)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    gram = a.T @ a
    out = wqer_round(w_aug, gram, row_grid(quantizer, 8), lam=1.0, refine_iters=refine_iters)
    torch.testing.assert_close(quantizer(out[:, :-1].float()).double(), out[:, :-1], atol=1e-6, rtol=0)
    plain = torch.cat([quantizer(weight.float()).double(), bias[:, None]], 1)
    moments = _moments(a, a)
    assert calibration_error(out, w_aug, moments) < calibration_error(plain, w_aug, moments)


# --------------------------------------------------------------------------------------- layer inputs
def test_input_rows_of_a_conv_reproduce_the_convolution():
    conv = nn.Conv2d(3, 4, kernel_size=4, stride=4, padding=1)
    point = QConv2d(conv, "image")
    x = torch.randn(2, 3, 17, 17)
    rows = input_rows(point, x)
    out = rows @ conv.weight.reshape(4, -1).T + conv.bias
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gather_input_moments_sums_rows_over_batches():
    linear = QLinear(nn.Linear(6, 3), "act")
    act = build_quantizer({"kind": "uniform", "bits": 4})
    x = torch.randn(5, 7, 6)
    act.calibrate(x)
    linear.input_quantizer = act
    (m,), out = gather_input_moments(linear, x, [linear], float_inputs=True, batch_size=2)
    rows = x.reshape(-1, 6).double()
    a = torch.cat([act(x).reshape(-1, 6).double(), torch.ones(35, 1, dtype=torch.float64)], 1)
    b = torch.cat([rows, torch.ones(35, 1, dtype=torch.float64)], 1)
    assert m.rows == 35 and m.channels == 6
    torch.testing.assert_close(m.quantized, a.T @ a)
    torch.testing.assert_close(m.cross, a.T @ b)
    torch.testing.assert_close(m.float, b.T @ b)
    torch.testing.assert_close(out, linear(x))


def test_gather_input_moments_pairs_rows_with_a_reference_run():
    linear = QLinear(nn.Linear(6, 3), "act")
    act = build_quantizer({"kind": "uniform", "bits": 3})
    x, x_ref = torch.randn(5, 4, 6), torch.randn(5, 4, 6)
    act.calibrate(x)
    linear.input_quantizer = act
    (m,), out = gather_input_moments(linear, x, [linear], reference=(linear, x_ref), batch_size=2)
    ones = torch.ones(20, 1, dtype=torch.float64)
    a = torch.cat([act(x).reshape(-1, 6).double(), ones], 1)
    b = torch.cat([x_ref.reshape(-1, 6).double(), ones], 1)
    torch.testing.assert_close(m.quantized, a.T @ a)
    torch.testing.assert_close(m.cross, a.T @ b)
    torch.testing.assert_close(m.float, b.T @ b)
    torch.testing.assert_close(out, linear(x))


# ----------------------------------------------------------------------------------------- end to end
VIT = "test_vit"
SWIN = "swin_tiny_patch4_window7_224"
SWIN_KWARGS = {"embed_dim": 24, "depths": (2, 2), "num_heads": (3, 6), "img_size": 112}


def _model(arch: str):
    torch.manual_seed(0)
    if arch == "vit":
        return VIT, randomize_norms(timm.create_model(VIT, pretrained=False).eval())
    return SWIN, randomize_norms(timm.create_model(SWIN, pretrained=False, **SWIN_KWARGS).eval())


@pytest.mark.parametrize(("method", "options"), [
    ("gptq", {}), ("erq", {}), ("gptq", {"group_size": 8}), ("gptq", {"group_size": 8, "act_order": True}),
    ("erq", {"dual_uniform": True}), ("erq", {"inputs": "quantized"}),
])
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_weights_end_on_their_grid(arch, method, options):
    name, model = _model(arch)
    images = torch.randn(2, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    reference = model(images)
    qmodel = vitq.quantize(model, QuantConfig(method=method, w_bits=4, a_bits=4, calib_size=2, options=options),
                           images, model_name=name, progress=False)
    weights = {n: p for n, p in qmodel.points().items() if isinstance(p, QLinear | QConv2d)}
    assert weights
    for point_name, point in weights.items():
        assert point.weight_quantizer.is_calibrated, point_name
        torch.testing.assert_close(point.weight_quantizer(point.weight), point.weight, atol=0, rtol=0,
                                   msg=f"{point_name} is not on its grid")
    out = qmodel(images)
    assert torch.isfinite(out).all() and out.shape == reference.shape
    dual = {n for n, p in weights.items() if p.weight_quantizer.kind == "dual_uniform"}
    fed_by_norm = {lin for _, lin in qmodel.norm_linear_pairs()}
    assert dual == (fed_by_norm if options.get("dual_uniform") else set())


def test_erq_never_keeps_a_layer_worse_than_plain_rounding_and_improves_most():
    name, model = _model("vit")
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    config = QuantConfig(method="erq", w_bits=3, a_bits=4, calib_size=4)
    method = method_class("erq")(config)
    qmodel = vitq.prepare(model, config, model_name=name)
    method.calibrate(qmodel, images, progress=False)
    errors = method.layer_errors
    assert len(errors) == sum(isinstance(p, QLinear | QConv2d) for p in qmodel.points().values())
    assert all(min(e.erq, e.plain) == pytest.approx(e.plain if e.kept_plain else e.erq) for e in errors)
    assert sum(e.erq < e.plain for e in errors) > len(errors) / 2


@pytest.mark.parametrize(("method", "options", "message"), [
    ("gptq", {"damp": -1}, "damp"),
    ("gptq", {"block_size": 0}, "block_size"),
    ("gptq", {"act_order": "yes"}, "act_order"),
    ("gptq", {"dual": 1}, "no option"),
    ("gptq", {"group_size": 0}, "group_size"),
    ("erq", {"lam": "big"}, "lam"),
    ("erq", {"refine_iters": -1}, "refine_iters"),
    ("erq", {"aqer": 1}, "aqer"),
    ("erq", {"inputs": "both"}, "inputs"),
])
def test_bad_options_are_named(method, options, message):
    with pytest.raises(VitqError, match=message):
        method_class(method)(QuantConfig(method=method, options=options))


@pytest.mark.parametrize("method", ["gptq", "erq"])
def test_results_are_deterministic(method):
    name, model = _model("vit")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    outs = [vitq.quantize(model, QuantConfig(method=method, w_bits=4, a_bits=4, calib_size=2), images,
                          model_name=name, progress=False)(images) for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


@pytest.mark.parametrize(("method", "options"), [("erq", {}), ("gptq", {"group_size": 16}),
                                                 ("erq", {"dual_uniform": True})])
def test_save_and_load_reproduce_the_rounded_model(tmp_path, method, options):
    name, model = _model("vit")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    qmodel = vitq.quantize(model, QuantConfig(method=method, w_bits=4, a_bits=4, calib_size=2, options=options),
                           images, model_name=name, progress=False)
    loaded = vitq.load(vitq.save(qmodel, tmp_path / "q.safetensors"))
    torch.testing.assert_close(loaded(images), qmodel(images), atol=0, rtol=0)


def test_erq_quantized_inputs_fit_the_float_model_on_the_calibration_images():
    # with inputs=quantized every layer's regression target is the *original* float model's output (the layers
    # already corrected must not leak into the reference), so on its own calibration images the model ends
    # closer to float than with the paper's float inputs, which ignore the error arriving from upstream
    name, model = _model("vit")
    images = torch.randn(4, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(images)
        gaps = {}
        for inputs in ("float", "quantized"):
            config = QuantConfig(method="erq", w_bits=8, a_bits=8, calib_size=4, options={"inputs": inputs})
            qmodel = vitq.quantize(model, config, images, model_name=name, progress=False)
            gaps[inputs] = float((qmodel(images) - reference).abs().max())
    assert gaps["quantized"] < 0.2 * gaps["float"], gaps


def test_weights_swapped_runs_the_original_weights_and_restores_the_new_ones():
    from vitq.methods.erq import _weights_swapped

    layers = [QLinear(nn.Linear(4, 3), "act"), QLinear(nn.Linear(3, 2, bias=False), "act")]
    x = torch.randn(5, 4)
    with torch.no_grad():
        originals = [(lay.weight.detach().clone(), None if lay.bias is None else lay.bias.detach().clone())
                     for lay in layers]
        before = layers[1](layers[0](x))
        for layer in layers:  # what a weight-rounding step does: new weights, and a bias where there was none
            set_weight_and_bias(layer, torch.randn(layer.weight.shape), torch.randn(layer.weight.shape[0]))
        after = layers[1](layers[0](x))
        with _weights_swapped(layers, originals):
            torch.testing.assert_close(layers[1](layers[0](x)), before)
        torch.testing.assert_close(layers[1](layers[0](x)), after)
