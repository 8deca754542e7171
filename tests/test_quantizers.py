"""Property tests of the uniform quantizer, its range initialisers, the registry and the state dict."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.errors import VitqError
from vitq.quantizers import Quantizer, UniformQuantizer, build_quantizer, check_bits, quantizer_kinds
from vitq.quantizers.ranges import minmax_range, mse_range_search, percentile_range
from vitq.quantizers.uniform import code_range, fake_quant, uniform_params

FAST = settings(max_examples=50, deadline=None)
EPS32 = torch.finfo(torch.float32).eps

bits_st = st.integers(2, 8)
init_st = st.sampled_from(["minmax", "percentile", "mse"])
value_st = st.floats(-1000, 1000, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def tensors(draw, min_ndim: int = 1, max_ndim: int = 3, max_side: int = 5) -> torch.Tensor:
    shape = draw(st.lists(st.integers(1, max_side), min_size=min_ndim, max_size=max_ndim))
    n = math.prod(shape)
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    values = draw(st.lists(value_st, min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32).reshape(shape) * scale


@st.composite
def layouts(draw, min_ndim: int = 1):
    """(x, granularity kwargs): tensor / channel on any axis (negative too) / head with dividing groups /
    row groups of a dividing size."""
    x = draw(tensors(min_ndim=min_ndim))
    granularity = draw(st.sampled_from(["tensor", "channel", "head", "group"]))
    kwargs = {"granularity": granularity}
    if granularity == "group":
        row = math.prod(x.shape[1:])
        kwargs["group_size"] = draw(st.sampled_from([g for g in range(1, row + 1) if row % g == 0]))
    elif granularity != "tensor":
        axis = draw(st.integers(-x.ndim, x.ndim - 1))
        kwargs["axis"] = axis
        if granularity == "head":
            channels = x.shape[axis]
            kwargs["groups"] = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
    return x, kwargs


@st.composite
def quantizer_options(draw) -> dict:
    return {"bits": draw(bits_st), "signed": draw(st.booleans()), "symmetric": draw(st.booleans()),
            "init": draw(init_st)}


def _calibrated(x: torch.Tensor, **kwargs) -> UniformQuantizer:
    q = UniformQuantizer(**kwargs)
    q.calibrate(x)
    return q


def _groups(q: UniformQuantizer, t: torch.Tensor) -> torch.Tensor:
    """``t`` as [groups, elements], computed independently of the quantizer's own layout code."""
    if q.granularity == "tensor":
        return t.reshape(1, -1)
    if q.granularity == "group":
        return t.reshape(t.shape[0], -1).reshape(-1, q.group_size)
    moved = t.movedim(q.axis, 0)
    n = moved.shape[0] if q.granularity == "channel" else q.groups
    return moved.reshape(n, -1)


def _assert_same_group_result(x: torch.Tensor, got: torch.Tensor, ref: torch.Tensor, init: str) -> None:
    """Equal outputs; for the MSE search a float near-tie between candidates (the error sums are
    reduced in a different order) may pick another candidate, but only one with the same error."""
    if torch.equal(got, ref):
        return
    assert init == "mse", (got, ref)
    err_got, err_ref = (got - x).double().pow(2).sum(), (ref - x).double().pow(2).sum()
    assert math.isclose(err_got, err_ref, rel_tol=1e-5, abs_tol=1e-12), (got, ref)


def _expand(q: UniformQuantizer, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-group parameter as a tensor of ``x``'s shape (independent of ``_broadcast``)."""
    if q.granularity == "tensor":
        return param.reshape(()).expand(x.shape)
    if q.granularity == "group":
        return param.reshape(x.shape[0], -1).repeat_interleave(q.group_size, dim=1).reshape(x.shape)
    moved = x.movedim(q.axis, 0)
    per_channel = param.repeat_interleave(moved.shape[0] // param.numel())
    full = per_channel.reshape(-1, *[1] * (moved.ndim - 1)).expand(moved.shape)
    return full.movedim(0, q.axis)


# ------------------------------------------------------------------ core properties


@FAST
@given(layouts(), quantizer_options())
def test_codes_in_range_and_dequantize_matches_forward(layout, options):
    x, gran = layout
    q = _calibrated(x, **options, **gran)
    codes = q.int_repr(x)
    q_min, q_max = code_range(options["bits"], options["signed"])
    assert codes.dtype == torch.int32
    assert codes.shape == x.shape
    assert int(codes.min()) >= q_min and int(codes.max()) <= q_max
    assert torch.equal(q.dequantize(codes), q(x))
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.isfinite(q.zero_point).all()
    assert torch.equal(q.zero_point, q.zero_point.round())


@FAST
@given(layouts(), quantizer_options())
def test_fake_quant_is_idempotent(layout, options):
    x, gran = layout
    q = _calibrated(x, **options, **gran)
    once = q(x)
    twice = q(once)
    scale = _expand(q, q.scale, x)
    # exact up to float32 rounding of x/Δ + z (a tiny relative error)
    assert torch.all((twice - once).abs() <= 1e-6 * (once.abs() + scale) + 1e-12)


@FAST
@given(layouts(), st.integers(2, 8), st.booleans(), st.booleans())
def test_minmax_error_is_at_most_half_a_step(layout, bits, signed, symmetric):
    x, gran = layout
    q = _calibrated(x, bits=bits, signed=signed, symmetric=symmetric, init="minmax", **gran)
    err = (q(x) - x).abs()
    scale, zero_point = _expand(q, q.scale, x), _expand(q, q.zero_point, x)
    # float32 slack for computing x/Δ + z and (code - z)·Δ on values of this magnitude
    slack = 8 * EPS32 * (x.abs() + zero_point.abs() * scale + scale * 2**bits)
    inside = torch.ones_like(x, dtype=torch.bool)
    if symmetric and not signed:
        inside = x >= 0  # an unsigned symmetric grid is [0, hi]: negatives are clipped by design
    assert torch.all(err[inside] <= (scale / 2 + slack)[inside])


@FAST
@given(layouts(), quantizer_options())
def test_error_is_at_most_half_a_step_inside_the_grid(layout, options):
    """Any init: elements inside the representable range [(q_min - z)Δ, (q_max - z)Δ] round to Δ/2."""
    x, gran = layout
    q = _calibrated(x, **options, **gran)
    scale, zero_point = _expand(q, q.scale, x), _expand(q, q.zero_point, x)
    lo, hi = (q.q_min - zero_point) * scale, (q.q_max - zero_point) * scale
    inside = (x >= lo) & (x <= hi)
    slack = 8 * EPS32 * (x.abs() + zero_point.abs() * scale + scale * 2 ** options["bits"])
    err = (q(x) - x).abs()
    assert torch.all(err[inside] <= (scale / 2 + slack)[inside])


@FAST
@given(layouts(), quantizer_options())
def test_bit_budget_per_group(layout, options):
    x, gran = layout
    q = _calibrated(x, **options, **gran)
    for row in _groups(q, q(x)):
        assert row.unique().numel() <= 2 ** options["bits"]
    for row in _groups(q, q.int_repr(x)):
        assert row.unique().numel() <= 2 ** options["bits"]


@FAST
@given(tensors(min_ndim=2, max_ndim=3), quantizer_options(), st.data())
def test_constant_channel_is_exact(x, options, data):
    """A constant channel (e.g. a LayerNorm weight of exactly 0 folded in) is reproduced exactly."""
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    channel = data.draw(st.integers(0, x.shape[axis] - 1))
    value = data.draw(st.one_of(st.just(0.0), value_st, st.sampled_from([1e-6, -3e-7, 0.1, -0.1, 1 / 3, 7.0])))
    if options["symmetric"] and not options["signed"]:
        value = abs(value)  # negatives are not representable on an unsigned symmetric grid
    x = x.clone()
    x.select(axis, channel).fill_(value)
    q = _calibrated(x, granularity="channel", axis=axis, **options)
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.equal(q(x).select(axis, channel), x.select(axis, channel))


@FAST
@given(st.sampled_from([0.0, 1.0, -1.0, 0.1, -2.5, 1e-5, 123.456, 1 / 3, 1.1754943508222875e-38, -1e-40]),
       st.integers(1, 6), quantizer_options())
def test_constant_tensor_is_exact(value, n, options):
    if options["symmetric"] and not options["signed"]:
        value = abs(value)
    x = torch.full((n, 3), value)
    for granularity in ("tensor", "channel"):
        q = _calibrated(x, granularity=granularity, **options)
        assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
        assert torch.equal(q(x), x)


def test_all_zero_layernorm_channel_regression():
    weight = torch.randn(8, 6)
    weight[3] = 0.0  # a LayerNorm weight of exactly 0 folded into the next linear layer
    q = _calibrated(weight, bits=4, granularity="channel", axis=0)
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.equal(q(weight)[3], torch.zeros(6))


@FAST
@given(layouts(min_ndim=1), quantizer_options())
def test_per_channel_equals_per_tensor_on_each_channel(layout, options):
    x, _ = layout
    axis = -1 if x.ndim == 1 else 1 - x.ndim  # exercise a negative axis too
    for ax in {0, axis, x.ndim - 1}:
        q = _calibrated(x, granularity="channel", axis=ax, **options)
        out = q(x)
        for i in range(x.shape[ax]):
            xs = x.select(ax, i)
            _assert_same_group_result(xs, out.select(ax, i), _calibrated(xs, granularity="tensor", **options)(xs),
                                      options["init"])


@FAST
@given(layouts(min_ndim=1), quantizer_options(), st.data())
def test_per_head_equals_per_tensor_on_each_head(layout, options, data):
    x, _ = layout
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    channels = x.shape[axis]
    groups = data.draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
    q = _calibrated(x, granularity="head", axis=axis, groups=groups, **options)
    out = q(x)
    for xs, outs in zip(x.chunk(groups, dim=axis), out.chunk(groups, dim=axis), strict=True):
        _assert_same_group_result(xs, outs, _calibrated(xs, granularity="tensor", **options)(xs), options["init"])


@FAST
@given(tensors(min_ndim=2), quantizer_options(), st.data())
def test_per_group_equals_per_tensor_on_each_row_group(x, options, data):
    row = math.prod(x.shape[1:])
    size = data.draw(st.sampled_from([g for g in range(1, row + 1) if row % g == 0]))
    q = _calibrated(x, granularity="group", group_size=size, **options)
    out = q(x).reshape(x.shape[0], -1)
    for r, row_values in enumerate(x.reshape(x.shape[0], -1)):
        for start in range(0, row, size):
            xs = row_values[start:start + size]
            _assert_same_group_result(xs, out[r, start:start + size],
                                      _calibrated(xs, granularity="tensor", **options)(xs), options["init"])


def test_group_needs_a_dividing_size():
    q = UniformQuantizer(4, granularity="group", group_size=4)
    with pytest.raises(VitqError, match="groups of 4"):
        q.calibrate(torch.randn(2, 6))


def test_head_needs_divisible_channels():
    q = UniformQuantizer(4, granularity="head", axis=1, groups=4)
    with pytest.raises(VitqError, match="heads"):
        q.calibrate(torch.randn(2, 6))


def test_channel_axis_out_of_range():
    q = UniformQuantizer(4, granularity="channel", axis=2)
    with pytest.raises(VitqError, match="axis"):
        q.calibrate(torch.randn(2, 6))


# ------------------------------------------------------------------ range initialisers vs references


@FAST
@given(tensors(min_ndim=2, max_ndim=2, max_side=9), st.floats(0.5, 1.0, exclude_min=True))
def test_percentile_range_matches_torch_quantile(rows, p):
    lo, hi = percentile_range(rows, p)
    ref = torch.quantile(rows.double(), torch.tensor([1 - p, p], dtype=torch.float64), dim=1)
    tol = 1e-5 * (rows.abs().amax() + 1e-6)
    assert torch.allclose(lo.double(), ref[0], atol=float(tol), rtol=0)
    assert torch.allclose(hi.double(), ref[1], atol=float(tol), rtol=0)


def test_percentile_range_one_is_minmax():
    rows = torch.randn(4, 17)
    assert all(torch.equal(a, b) for a, b in zip(percentile_range(rows, 1.0), minmax_range(rows), strict=True))
    with pytest.raises(ValueError):
        percentile_range(rows, 0.5)


def _scalar_fake_quant(row: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Reference asymmetric unsigned fake-quant of one row, written out without vitq helpers."""
    n = 2**bits - 1
    scale = max((hi - lo) / n, 1e-8)
    zero = -round(lo / scale)
    codes = torch.clamp(torch.round(row.double() / scale) + zero, 0, n)
    return (codes - zero) * scale


@FAST
@given(tensors(min_ndim=2, max_ndim=2, max_side=12), st.integers(2, 6),
       st.lists(st.floats(0.55, 1.0), min_size=1, max_size=4, unique=True))
def test_mse_range_search_matches_reference_loop(rows, bits, candidates):
    def quantize_rows(r, lo, hi):
        return torch.stack([_scalar_fake_quant(r[i], float(lo[i]), float(hi[i]), bits) for i in range(len(r))])

    lo, hi = mse_range_search(rows.double(), quantize_rows, candidates)
    for i, row in enumerate(rows.double()):
        errs, ranges = [], []
        for p in candidates:
            c_lo, c_hi = torch.quantile(row, torch.tensor([1 - p, p], dtype=torch.float64)).tolist()
            errs.append(float((_scalar_fake_quant(row, c_lo, c_hi, bits) - row).pow(2).sum()))
            ranges.append((c_lo, c_hi))
        best = min(range(len(candidates)), key=errs.__getitem__)
        tol = 1e-9 * (float(row.abs().max()) + 1)
        if abs(lo[i] - ranges[best][0]) > tol or abs(hi[i] - ranges[best][1]) > tol:
            # only a (numerical) tie may pick another candidate; its error must equal the minimum
            got = float((_scalar_fake_quant(row, float(lo[i]), float(hi[i]), bits) - row).pow(2).sum())
            assert math.isclose(got, errs[best], rel_tol=1e-9, abs_tol=1e-12), (i, got, errs)


def test_mse_init_is_never_worse_than_its_candidates():
    torch.manual_seed(0)
    x = torch.randn(6, 200)
    x[0, 0] = 40.0  # an outlier the search should clip
    q = _calibrated(x, bits=4, granularity="channel", init="mse", search_percentiles=(0.9, 0.99, 1.0))
    err = (q(x) - x).pow(2).sum(dim=1)
    for p in (0.9, 0.99, 1.0):
        ref = _calibrated(x, bits=4, granularity="channel", init="percentile", percentile=p)
        assert torch.all(err <= (ref(x) - x).pow(2).sum(dim=1) * (1 + 1e-6))


def test_uniform_params_formulas():
    lo, hi = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 4.0])
    scale, zero = uniform_params(lo, hi, 4, signed=False, symmetric=False)
    assert torch.allclose(scale, (hi - lo) / 15)
    assert torch.equal(zero, -torch.round(lo / scale))
    scale, zero = uniform_params(lo, hi, 4, signed=True, symmetric=True)
    assert torch.allclose(scale, torch.tensor([2.0, 4.0]) / 7) and torch.equal(zero, torch.zeros(2))
    out = fake_quant(torch.tensor([0.0, 100.0]), torch.tensor(1.0), torch.tensor(0.0), 0, 15)
    assert torch.equal(out, torch.tensor([0.0, 15.0]))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bits", [1, 9, 0, -4, True, False, 4.0, "4", None])
def test_bad_bits(bits):
    with pytest.raises(VitqError, match="bits"):
        UniformQuantizer(bits)
    with pytest.raises(VitqError):
        check_bits(bits)
    with pytest.raises(VitqError):
        build_quantizer({"kind": "uniform", "bits": bits})


@pytest.mark.parametrize("kwargs, match", [
    ({"granularity": "row"}, "granularity"),
    ({"init": "kl"}, "init"),
    ({"granularity": "head", "groups": 0}, "groups"),
    ({"percentile": 0.3}, "percentile"),
    ({"init": "mse", "search_percentiles": [1.5]}, "percentile"),
    ({"init": "mse", "search_percentiles": []}, "percentile"),
    ({"axis": 1.0}, "axis"),
    ({"granularity": "group"}, "group_size"),
    ({"granularity": "group", "group_size": 0}, "group_size"),
    ({"group_size": 8}, "group_size"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(VitqError, match=match):
        UniformQuantizer(4, **kwargs)
    with pytest.raises(VitqError, match=match):
        build_quantizer({"kind": "uniform", "bits": 4, **kwargs})


@pytest.mark.parametrize("spec, match", [
    ({"kind": "nope", "bits": 4}, "unknown quantizer kind 'nope'"),
    ({"bits": 4}, "unknown quantizer kind"),
    ({"kind": "uniform"}, "bad options"),
    ({"kind": "uniform", "bits": 4, "colour": "red"}, "bad options"),
])
def test_build_quantizer_errors(spec, match):
    with pytest.raises(VitqError, match=match):
        build_quantizer(spec)


def test_registry_and_spec():
    assert "uniform" in quantizer_kinds()
    q = build_quantizer({"kind": "uniform", "bits": 3, "signed": True, "granularity": "channel", "axis": -1})
    assert isinstance(q, UniformQuantizer) and isinstance(q, Quantizer)
    spec = q.spec()
    assert spec["kind"] == "uniform" and spec["bits"] == 3 and spec["axis"] == -1 and spec["signed"] is True
    assert build_quantizer(spec).spec() == spec


# ------------------------------------------------------------------ life cycle and state dict


def test_uncalibrated_use_raises():
    q = UniformQuantizer(4)
    assert not q.is_calibrated
    with pytest.raises(VitqError, match="before calibration"):
        q(torch.randn(3))


def test_calibrating_flag_calibrates_once():
    q = UniformQuantizer(4, granularity="channel")
    q.calibrating = True
    x = torch.randn(4, 5)
    out = q(x)
    assert q.is_calibrated and not q.calibrating
    assert torch.equal(out, _calibrated(x, bits=4, granularity="channel")(x))
    scale = q.scale.clone()
    q(x * 10)  # no longer calibrating: the range stays
    assert torch.equal(q.scale, scale)


def test_disabled_passes_through():
    q = UniformQuantizer(4)
    q.enabled = False
    x = torch.randn(5)
    assert q(x) is x


@FAST
@given(layouts(min_ndim=2), quantizer_options())
def test_state_dict_round_trip(layout, options):
    x, _ = layout
    q = _calibrated(x, granularity="channel", axis=-1, **options)
    fresh = build_quantizer(q.spec())
    assert not fresh.is_calibrated
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_calibrated
    assert fresh.spec() == q.spec()
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.int_repr(x), q.int_repr(x))
    y = torch.randn_like(x) * 5
    assert torch.equal(fresh(y), q(y))


def test_integer_grid_problem_names_what_deployment_cannot_take():
    from vitq.quantizers.uniform import integer_grid_problem

    x = torch.randn(4, 6)
    per_row = build_quantizer({"kind": "uniform", "bits": 4, "granularity": "channel", "axis": 0})
    per_row.calibrate(x)
    assert integer_grid_problem(per_row, per_row=True) is None
    assert "per-channel" in integer_grid_problem(per_row, per_row=False)
    per_tensor = build_quantizer({"kind": "uniform", "bits": 4})
    per_tensor.calibrate(x)
    assert integer_grid_problem(per_tensor, per_row=False) is None
    per_tensor.set_params({"zero_point": torch.tensor([2.5])})
    assert "fractional zero point (e.g. 2.500)" in integer_grid_problem(per_tensor, per_row=False)
    log = build_quantizer({"kind": "log2", "bits": 4})
    assert integer_grid_problem(log, per_row=False) == "log2 quantizer (not uniform)"
    assert "not quantized" in integer_grid_problem(None, per_row=True)
