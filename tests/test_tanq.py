"""Property tests of TanQ (reconstructed, both maps) and the output-error search harness."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.calib.search import attention_output_mse, search_by_output_error
from vitq.errors import VitqError
from vitq.quantizers import TanQuantizer, UniformQuantizer, build_quantizer, quantizer_kinds
from vitq.quantizers.tan import TAN_MAPS

FAST = settings(max_examples=50, deadline=None)

bits_st = st.integers(2, 8)
variant_st = st.sampled_from(["tan", "tan_log"])
prob_st = st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1, allow_nan=False, allow_subnormal=False, width=32))


@st.composite
def probabilities(draw, max_side: int = 5) -> torch.Tensor:
    """Small tensors of values in [0, 1]: raw (with exact 0s and 1s) or softmax rows."""
    shape = draw(st.lists(st.integers(1, max_side), min_size=0, max_size=3))
    n = math.prod(shape)
    if draw(st.booleans()) or not shape:
        values = draw(st.lists(prob_st, min_size=n, max_size=n))
        return torch.tensor(values, dtype=torch.float32).reshape(shape)
    logits = draw(st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=n, max_size=n))
    return torch.tensor(logits, dtype=torch.float32).reshape(shape).softmax(-1)


@st.composite
def params(draw, variant: str) -> dict[str, torch.Tensor]:
    """Any valid (clip, shape), not only the calibration grid's."""
    clip = draw(st.floats(1e-3, 1.0))
    s = draw(st.floats(0.05, 0.995 if variant == "tan" else 50.0))
    return {"clip": torch.tensor(clip), "shape": torch.tensor(s)}


def _calibrated(x: torch.Tensor, bits: int, variant: str) -> TanQuantizer:
    q = TanQuantizer(bits, variant=variant)
    q.calibrate(x)
    return q


def _check_quantizer(q: TanQuantizer, x: torch.Tensor) -> None:
    n, clip = 2**q.bits, float(q.clip)
    codes = q.int_repr(x)
    assert codes.dtype == torch.int32 and codes.shape == x.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= n - 1
    y = q(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.isnan(y).any()
    assert torch.equal(q.dequantize(codes), y)
    assert torch.equal(q(y), y)  # idempotent
    assert bool(((y >= 0) & (y <= clip)).all())
    levels = q.levels()
    assert levels.shape == (n,) and not torch.isnan(levels).any()
    assert bool(((levels >= 0) & (levels <= clip)).all())
    assert bool(torch.isin(y, levels).all())
    steps = levels.diff()
    if q.variant == "tan":  # increasing with the code, 0 at code 0, clip at code n − 1
        assert bool((steps > 0).all()), levels
        assert float(levels[0]) == 0.0 and float(levels[-1]) == clip
    else:  # decreasing: clip at code 0, 0 at code n − 1 (tiny levels may underflow to 0 too)
        assert bool((steps <= 0).all()), levels
        positive = levels[levels > 0]
        assert bool((positive.diff() < 0).all()), levels
        assert float(levels[0]) == clip and float(levels[-1]) == 0.0
    # x = 0 → exactly 0; x = clip (and above) → exactly clip; no NaN at the ends
    ends = q(torch.tensor([0.0, clip, 1.0, 2.0 * clip, -0.5]))
    assert ends.tolist() == [0.0, clip, clip, clip, 0.0]


@FAST
@given(probabilities(), bits_st, variant_st)
def test_calibrated_quantizer_properties(x, bits, variant):
    _check_quantizer(_calibrated(x, bits, variant), x)


@FAST
@given(st.data(), probabilities(), bits_st, variant_st)
def test_properties_for_any_parameters(data, x, bits, variant):
    q = TanQuantizer(bits, variant=variant)
    q.set_params(data.draw(params(variant)))
    _check_quantizer(q, x)


def _reference_code(t: float, variant: str, s: float, n: int) -> float:
    """The unrounded code of the docstring formulas, in float64 (independent of the implementation)."""
    t = min(max(t, 0.0), 1.0)
    if variant == "tan":
        f = math.tan(s * math.pi * (t - 0.5)) / math.tan(s * math.pi / 2)
        return (f + 1) / 2 * (n - 1)
    if t == 0.0:
        return n - 1
    return 2 / math.pi * math.atan(-math.log2(t) / s) * (n - 1)


def _reference_level(k: int, variant: str, s: float, n: int) -> float:
    if variant == "tan":
        return 0.5 + math.atan((2 * k / (n - 1) - 1) * math.tan(s * math.pi / 2)) / (s * math.pi)
    return 0.0 if k == n - 1 else 2.0 ** (-s * math.tan(k / (n - 1) * math.pi / 2))


@FAST
@given(st.data(), probabilities(), bits_st, variant_st)
def test_matches_documented_formulas(data, x, bits, variant):
    q = TanQuantizer(bits, variant=variant)
    q.set_params(data.draw(params(variant)))
    n, clip, s = 2**bits, float(q.clip), float(q.shape)
    codes = q.int_repr(x).reshape(-1).tolist()
    for value, code in zip(x.reshape(-1).tolist(), codes, strict=True):
        exact = _reference_code(value / clip, variant, s, n)
        if abs(exact - math.floor(exact) - 0.5) > 0.01:  # away from a rounding tie
            assert code == min(max(round(exact), 0), n - 1), (value, exact)
    levels = q.levels().tolist()
    for k, level in enumerate(levels):
        assert level == pytest.approx(clip * _reference_level(k, variant, s, n), rel=1e-5,
                                     abs=1e-12 if variant == "tan" else 1e-30)


@FAST
@given(probabilities(), bits_st)
def test_tan_levels_dense_at_both_ends(x, bits):
    q = _calibrated(x, bits, "tan")
    assert float(torch.tensor(0.5)) <= float(q.shape) <= float(torch.tensor(0.995))
    gaps = q.levels().diff()
    middle = gaps[len(gaps) // 2]
    assert float(gaps[0]) < float(middle) and float(gaps[-1]) < float(middle)


@FAST
@given(probabilities(), bits_st, variant_st)
def test_calibrate_is_the_grid_argmin_of_the_input_error(x, bits, variant):
    q = _calibrated(x, bits, variant)
    chosen = (float(q.clip), float(q.shape))
    errors = []
    for cand in q.search_candidates(x):
        q.set_params(cand)
        errors.append((float((q(x) - x).double().square().sum()), (float(cand["clip"]), float(cand["shape"]))))
    assert chosen in [c for _, c in errors]
    best = min(e for e, _ in errors)
    err_chosen = next(e for e, c in errors if c == chosen)
    assert err_chosen == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_grid_and_clip_candidates():
    x = torch.rand(4, 3, 10, 10).softmax(-1)
    for variant in TAN_MAPS:
        q = TanQuantizer(4, variant=variant)
        cands = q.search_candidates(x)
        clips = q.clip_candidates(x)
        assert len(cands) == len(clips) * len(q.shapes) and len(q.shapes) == 10
        assert 1.0 in clips and pytest.approx(float(x.max())) in clips
        assert all(set(c) == {"clip", "shape"} for c in cands)
    assert min(TanQuantizer(4, variant="tan").shapes) == 0.5 and max(TanQuantizer(4, variant="tan").shapes) == 0.995
    c_grid = TanQuantizer(4).shapes
    assert c_grid[0] == pytest.approx(0.25) and c_grid[-1] == pytest.approx(8.0)
    ratios = [b / a for a, b in zip(c_grid, c_grid[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios))  # log-spaced
    # all-zero input: only the 1.0 fallback clip
    assert TanQuantizer(4).clip_candidates(torch.zeros(5)) == [1.0]


def test_default_variant_and_registry():
    assert "tanq" in quantizer_kinds()
    q = build_quantizer({"kind": "tanq", "bits": 4})
    assert isinstance(q, TanQuantizer) and q.variant == "tan_log"


@FAST
@given(probabilities(), bits_st, variant_st, st.booleans())
def test_spec_state_dict_round_trip(x, bits, variant, custom):
    kwargs = {"shapes": [0.6, 0.9]} if custom and variant == "tan" else {"shapes": [0.5, 2.0]} if custom else {}
    q = TanQuantizer(bits, variant=variant, **kwargs)
    q.calibrate(x)
    fresh = build_quantizer(q.spec())
    assert fresh.spec() == q.spec()
    assert not fresh.is_calibrated
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.levels(), q.levels())


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(VitqError, match="bits"):
        TanQuantizer(bits)
    with pytest.raises(VitqError):
        build_quantizer({"kind": "tanq", "bits": bits})


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "sin"}, "variant"),
    ({"variant": "tan", "shapes": [0.5, 1.0]}, "alpha"),
    ({"variant": "tan", "shapes": [0.0]}, "alpha"),
    ({"variant": "tan", "shapes": [0.99999999]}, "alpha"),  # rounds to 1.0 in the float32 buffer
    ({"variant": "tan_log", "shapes": [-1.0]}, "c > 0"),
    ({"variant": "tan_log", "shapes": [math.inf]}, "c > 0"),
    ({"shapes": []}, "at least one"),
    ({"shapes": ["a"]}, "numbers"),
    ({"clip_percentiles": [0.2]}, "percentiles"),
    ({"colour": "red"}, "bad options"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(VitqError, match=match):
        build_quantizer({"kind": "tanq", "bits": 4, **kwargs})


def test_uncalibrated_use_is_an_error():
    q = TanQuantizer(4)
    with pytest.raises(VitqError, match="before calibration"):
        q(torch.rand(3))
    with pytest.raises(VitqError, match="before calibration"):
        q.levels()


def test_lower_precision_input_keeps_dtype():
    # values exact in bfloat16, so that both calls quantize the same numbers
    x = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)).softmax(-1).bfloat16().float()
    q = _calibrated(x, 4, "tan_log")
    y = q(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, q(x).to(torch.bfloat16))


# ------------------------------------------------------------------ output-error search
@st.composite
def attention_problems(draw):
    b, h, n, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(2, 6)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    temp = draw(st.sampled_from([0.5, 2.0, 6.0]))
    attn = (torch.randn(b, h, n, n, generator=g) * temp).softmax(-1)
    v = torch.randn(b, h, n, d, generator=g)
    return attn, v


def _output_error(q, attn, v) -> float:
    return float((q.quantize_dequantize(attn) @ v - attn @ v).double().square().sum())


@FAST
@given(attention_problems(), bits_st, variant_st)
def test_search_returns_the_exhaustive_argmin(problem, bits, variant):
    attn, v = problem
    q = TanQuantizer(bits, variant=variant)
    # independent exhaustive loop
    probe = TanQuantizer(bits, variant=variant)
    errors = []
    for cand in probe.search_candidates(attn):
        probe.set_params(cand)
        errors.append(_output_error(probe, attn, v))
    best_err = min(errors)
    best = q.search_candidates(attn)[errors.index(best_err)]

    got = search_by_output_error(q, attn, lambda a: a @ v)
    assert set(got) == {"clip", "shape"}
    assert torch.equal(q.clip, got["clip"]) and torch.equal(q.shape, got["shape"])  # installed
    if not (torch.equal(got["clip"], best["clip"]) and torch.equal(got["shape"], best["shape"])):
        # a float near-tie between candidates may pick another one, but only one with the same error
        assert _output_error(q, attn, v) == pytest.approx(best_err, rel=1e-9, abs=1e-12)

    # chunked over the batch with a given reference: the same error
    q2 = TanQuantizer(bits, variant=variant)
    search_by_output_error(q2, attn, lambda a, s: a @ v[s], reference=attn @ v, chunk=1)
    assert _output_error(q2, attn, v) == pytest.approx(best_err, rel=1e-6, abs=1e-9)

    # never worse than plain calibration on the output error
    plain = _calibrated(attn, bits, variant)
    assert _output_error(q, attn, v) <= _output_error(plain, attn, v) * (1 + 1e-9) + 1e-12

    rel = attention_output_mse(q, attn, v)
    ref = float((attn @ v).double().square().sum())
    assert rel == pytest.approx(_output_error(q, attn, v) / ref) if ref > 0 else rel in (0.0, math.inf)


def test_search_falls_back_to_calibrate_without_candidates():
    attn = torch.randn(2, 4, 4).softmax(-1)
    v = torch.randn(2, 4, 3)
    q = UniformQuantizer(4)
    got = search_by_output_error(q, attn, lambda a: a @ v)
    plain = UniformQuantizer(4)
    plain.calibrate(attn)
    assert torch.equal(got["scale"], plain.scale) and torch.equal(got["zero_point"], plain.zero_point)
    assert torch.equal(q.scale, plain.scale)


def test_attention_output_mse_values():
    attn = torch.eye(3).expand(2, 3, 3)
    q = TanQuantizer(4, variant="tan")
    q.calibrate(attn)  # 0 and 1 are levels: lossless
    assert attention_output_mse(q, attn, torch.randn(2, 3, 2)) == 0.0
    assert attention_output_mse(q, attn, torch.zeros(2, 3, 2)) == 0.0
    with pytest.raises(VitqError, match="chunk"):
        search_by_output_error(q, attn, lambda a, s: a, chunk=0)
