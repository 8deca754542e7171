"""Property tests of the log2 / log√2 post-Softmax quantizers and their integer shift kernels for Q(A)·V."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq.quantizers.log as logmod
from vitq.errors import VitqError
from vitq.quantizers import Log2Quantizer, LogSqrt2Quantizer, build_quantizer, quantizer_kinds
from vitq.quantizers.log import log2_attention_matmul, log_sqrt2_attention_matmul

FAST = settings(max_examples=50, deadline=None)
KINDS = {"log2": (Log2Quantizer, 1), "log_sqrt2": (LogSqrt2Quantizer, 2)}  # class, steps per octave

bits_st = st.integers(2, 8)
kind_st = st.sampled_from(sorted(KINDS))


@st.composite
def softmax_maps(draw, max_side: int = 6) -> torch.Tensor:
    """Random attention maps [heads, rows, keys] (rows sum to 1), sharp enough to underflow, with some
    exact zeros."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    seed = draw(st.integers(0, 2**31 - 1))
    temperature = draw(st.sampled_from([0.5, 2.0, 8.0, 30.0]))
    gen = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(shape, generator=gen) * temperature, dim=-1)
    zeros = torch.rand(shape, generator=gen) < draw(st.sampled_from([0.0, 0.2]))
    return attn.masked_fill(zeros, 0.0)


def _calibrated(kind: str, bits: int, x: torch.Tensor, **kwargs):
    q = KINDS[kind][0](bits, **kwargs)
    q.calibrate(x)
    return q


def _repq_reference(x: torch.Tensor, delta: torch.Tensor, bits: int, steps: int) -> torch.Tensor:
    """RepQ-ViT's LogSqrt2Quantizer.quantize, verbatim (steps = 2), and its log2 analogue (steps = 1)."""
    n_levels = 2**bits
    x_int = torch.round(-1 * (x / delta).log2() * steps)
    mask = x_int >= n_levels
    x_quant = torch.clamp(x_int, 0, n_levels - 1)
    if steps == 2:
        odd_mask = (x_quant % 2) * (math.sqrt(2) - 1) + 1
        x_float_q = 2 ** (-1 * torch.ceil(x_quant / 2)) * odd_mask * delta
    else:
        x_float_q = 2 ** (-1 * x_quant) * delta
    x_float_q[mask] = 0
    return x_float_q


def _level_table(delta: float, bits: int, steps: int) -> torch.Tensor:
    """Δ·2^(−q/steps) for q = 0..n−1, in float64, built independently of the quantizer."""
    return torch.tensor([delta * 2.0 ** (-q / steps) for q in range(2**bits)], dtype=torch.float64)


# ------------------------------------------------------------------ codes, levels, fake quant


@FAST
@given(softmax_maps(), bits_st, kind_st)
def test_codes_in_range_and_dequantize_matches_forward(x, bits, kind):
    q = _calibrated(kind, bits, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes = q.int_repr(x)
        out = q(x)
    n = 2**bits
    assert q.zero_code == q.n_levels == n
    assert codes.dtype == torch.int32 and codes.shape == x.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= n
    assert torch.equal(q.dequantize(codes), out)
    assert torch.isfinite(out).all() and torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.all(out[codes == n] == 0)
    if bits <= 6:  # (at 7-8 bits log2's deepest levels Δ·2^−q can underflow float32 to 0)
        assert torch.all(out[codes < n] > 0)
    assert torch.all(codes[x == 0] == n)


@FAST
@given(softmax_maps(), bits_st, kind_st)
def test_matches_repq_vit_formula_exactly(x, bits, kind):
    q = _calibrated(kind, bits, x)
    ref = _repq_reference(x, q.scale.reshape(()), bits, KINDS[kind][1])
    assert torch.equal(q(x), ref)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bits", range(2, 9))
def test_dequantize_is_monotone_in_the_code(kind, bits):
    q = KINDS[kind][0](bits)
    q.set_params({"scale": torch.tensor([0.8])})
    n = 2**bits
    values = q.dequantize(torch.arange(n, dtype=torch.int32))
    nonzero = values[values > 0]
    assert torch.all(values[1:] <= values[:-1])
    assert torch.all(nonzero[1:] < nonzero[:-1])  # distinct levels until float32 underflow
    assert values[0] == q.scale[0]
    zero = q.dequantize(torch.tensor([n, n + 1, 10 * n], dtype=torch.int32))
    assert torch.equal(zero, torch.zeros(3))


@FAST
@given(softmax_maps(), bits_st, kind_st)
def test_fake_quant_is_idempotent(x, bits, kind):
    q = _calibrated(kind, bits, x)
    once = q(x)
    assert torch.equal(q(once), once)
    assert torch.equal(q.int_repr(once), q.int_repr(x))


@FAST
@given(softmax_maps(), bits_st, kind_st)
def test_outputs_lie_in_the_level_set(x, bits, kind):
    q = _calibrated(kind, bits, x)
    steps = KINDS[kind][1]
    table = _level_table(float(q.scale), bits, steps)
    out, codes = q(x).double(), q.int_repr(x).long()
    nonzero = codes < 2**bits
    expected = table[codes[nonzero]]
    assert torch.allclose(out[nonzero], expected, rtol=1e-6, atol=1e-44)
    assert torch.all(out[~nonzero] == 0)
    # and each non-zero output is the nearest level in the log domain (within rounding)
    log_x = torch.log2(x.double()[nonzero] / float(q.scale)) * -steps
    assert torch.all((log_x.clamp(min=0) - codes[nonzero]).abs() <= 0.5 + 1e-5)


@FAST
@given(softmax_maps(), bits_st, kind_st, st.floats(1.0, 100.0))
def test_saturation_and_zero(x, bits, kind, factor):
    q = _calibrated(kind, bits, x)
    delta = q.scale.reshape(())
    big = torch.stack([delta, delta * factor, torch.tensor(float("inf"))])
    assert torch.equal(q(big), delta.expand(3))
    assert torch.equal(q.int_repr(big), torch.zeros(3, dtype=torch.int32))
    zeros = torch.tensor([0.0, -0.0, -1.0])
    assert torch.equal(q(zeros), torch.zeros(3))
    assert torch.equal(q.int_repr(zeros), torch.full((3,), 2**bits, dtype=torch.int32))


def test_all_zero_input_calibrates_without_nan():
    for cls in (Log2Quantizer, LogSqrt2Quantizer):
        q = cls(4)
        x = torch.zeros(3, 4, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            q.calibrate(x)
            out = q(x)
        assert torch.isfinite(q.scale).all() and float(q.scale) > 0
        assert torch.equal(out, x)


def test_three_bit_log_sqrt2_spans_only_four_octaves():
    """docs/protocol.md#softmax-quantizers-alone: at 3 bits log√2 zeroes everything below Δ·2^−4 (it only covers 2^b/2
    octaves), log2 keeps down to Δ·2^−7: the collapse mechanism of RepQ-ViT at W3A3."""
    delta = 0.5
    x = delta * torch.tensor([2.0**-3.5, 2.0**-4, 2.0**-5, 2.0**-7, 2.0**-7.4, 2.0**-8])
    sqrt2, log2 = LogSqrt2Quantizer(3), Log2Quantizer(3)
    for q in (sqrt2, log2):
        q.set_params({"scale": torch.tensor([delta])})
    assert torch.equal(sqrt2(x)[1:], torch.zeros(5))  # everything from Δ·2^−4 down is 0
    assert sqrt2(x)[0] == x[0]  # Δ·2^−3.5 is its smallest level
    assert torch.equal(log2(x)[1:4], x[1:4])  # log2 keeps Δ·2^−4 ... Δ·2^−7
    assert log2(x)[4] == delta * 2.0**-7 and log2(x)[5] == 0


# ------------------------------------------------------------------ calibration


@FAST
@given(softmax_maps(), bits_st, kind_st, st.booleans())
def test_calibration_picks_the_argmin_over_candidates(x, bits, kind, with_fixed):
    fixed = [1.0] if with_fixed else []
    q = _calibrated(kind, bits, x, fixed_scales=fixed)
    steps = KINDS[kind][1]
    flat = x.reshape(-1)
    candidates = [torch.quantile(flat, p) for p in (0.999, 0.9999, 0.99999)] + [torch.tensor(s) for s in fixed]
    candidates = [c.clamp_min(logmod.MIN_SCALE) for c in candidates]
    got = q.search_candidates(x)
    assert len(got) == len(candidates)
    for mine, ref in zip(got, candidates, strict=True):
        assert set(mine) == {"scale"}
        assert torch.allclose(mine["scale"].reshape(()), ref, rtol=1e-6, atol=0)
    errors = [float((_repq_reference(x, c, bits, steps) - x).double().square().sum()) for c in candidates]
    best = min(range(len(errors)), key=errors.__getitem__)
    err_got = float((q(x) - x).double().square().sum())
    if not torch.allclose(q.scale.reshape(()), candidates[best], rtol=1e-6, atol=0):
        # a float near-tie between candidates may choose another one, but only one with the same error
        assert math.isclose(err_got, errors[best], rel_tol=1e-5, abs_tol=1e-12)
    assert all(err_got <= e * (1 + 1e-5) + 1e-12 for e in errors)


def test_search_candidates_and_set_params():
    x = torch.softmax(torch.randn(4, 10, 10) * 4, dim=-1)
    q = LogSqrt2Quantizer(4, search_percentiles=[0.99, 1.0], fixed_scales=[1.0])
    cands = q.search_candidates(x)
    assert [c["scale"].shape for c in cands] == [torch.Size([1])] * 3
    assert torch.allclose(cands[1]["scale"], x.max().reshape(1))
    assert float(cands[2]["scale"]) == 1.0
    q.set_params(cands[2])
    assert torch.equal(q(torch.tensor([1.0, 0.5])), torch.tensor([1.0, 0.5]))


def test_calibrating_flag_calibrates_once():
    x = torch.softmax(torch.randn(2, 6, 6), dim=-1)
    q = Log2Quantizer(4)
    q.calibrating = True
    q(x)
    scale = q.scale.clone()
    q(x * 0.1)
    assert torch.equal(q.scale, scale) and not q.calibrating


def test_uncalibrated_use_raises():
    with pytest.raises(VitqError, match="before calibration"):
        LogSqrt2Quantizer(4)(torch.rand(3))


# ------------------------------------------------------------------ spec / state dict


@FAST
@given(softmax_maps(), bits_st, kind_st, st.booleans())
def test_spec_and_state_dict_round_trip(x, bits, kind, with_fixed):
    q = _calibrated(kind, bits, x, fixed_scales=[1.0] if with_fixed else [], search_percentiles=[0.999, 1.0])
    spec = q.spec()
    assert spec["kind"] == kind and spec["bits"] == bits
    twin = build_quantizer(spec)
    assert type(twin) is type(q) and twin.spec() == spec
    twin.load_state_dict(q.state_dict())
    assert torch.equal(twin(x), q(x))
    assert torch.equal(twin.int_repr(x), q.int_repr(x))


def test_registered_kinds():
    assert {"log2", "log_sqrt2"} <= set(quantizer_kinds())
    assert isinstance(build_quantizer({"kind": "log2", "bits": 3}), Log2Quantizer)
    assert isinstance(build_quantizer({"kind": "log_sqrt2", "bits": 3}), LogSqrt2Quantizer)


# ------------------------------------------------------------------ shift kernels == fake-quant Q(A)·V


def _assert_kernel_matches(kernel_out: torch.Tensor, qa: torch.Tensor, v: torch.Tensor, rtol: float) -> None:
    ref = qa @ v
    magnitude = qa.abs() @ v.abs()  # error bound scale: sums with cancellation are compared absolutely
    assert kernel_out.shape == ref.shape and kernel_out.dtype == ref.dtype
    assert torch.all((kernel_out - ref).abs() <= rtol * magnitude + 1e-30)
    assert torch.allclose(kernel_out, ref, rtol=rtol, atol=rtol * float(magnitude.max()) + 1e-30)


@FAST
@given(softmax_maps(), bits_st, kind_st, st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_shift_kernel_equals_fake_quant_matmul(attn, bits, kind, d, seed):
    q = _calibrated(kind, bits, attn)
    v = torch.randn(attn.shape[0], attn.shape[-1], d, generator=torch.Generator().manual_seed(seed)) * 3
    codes = q.int_repr(attn)
    kernel = log_sqrt2_attention_matmul if kind == "log_sqrt2" else log2_attention_matmul
    out = kernel(codes, q.scale, v, bits)
    _assert_kernel_matches(out, q(attn), v, rtol=1e-5)
    assert torch.equal(out, q.attention_matmul(codes, v))
    # in float64 the only difference left is √2 rounded to float32 inside the fake-quant levels
    _assert_kernel_matches(kernel(codes, q.scale.double(), v.double(), bits), q(attn).double(), v.double(), 1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shift_kernel_with_underflow_codes_and_batch_dims(kind, bits, monkeypatch):
    gen = torch.Generator().manual_seed(bits)
    attn = torch.softmax(torch.randn(2, 3, 9, 9, generator=gen) * 6, dim=-1)
    attn[..., 0] = 0.0
    v = torch.randn(2, 3, 9, 4, generator=gen)
    q = _calibrated(kind, bits, attn)
    codes = q.int_repr(attn)
    assert bool((codes == 2**bits).any()) and bool((codes < 2**bits).any())
    if kind == "log_sqrt2":
        assert bool((codes % 2 == 1).logical_and(codes < 2**bits).any())  # odd (√2) codes exercised
    qa = q(attn)
    # the kernel must not read the float level table: break it and the kernel still works
    monkeypatch.setattr(logmod, "log2_values", None)
    monkeypatch.setattr(logmod, "log_sqrt2_values", None)
    out = q.attention_matmul(codes, v)
    _assert_kernel_matches(out, qa, v, rtol=1e-5)


def test_shift_kernel_all_zero_codes_and_errors():
    v = torch.randn(5, 3)
    codes = torch.full((4, 5), 16, dtype=torch.int32)
    assert torch.equal(log_sqrt2_attention_matmul(codes, 0.7, v, 4), torch.zeros(4, 3))
    assert torch.equal(log2_attention_matmul(codes, 0.7, v, 4), torch.zeros(4, 3))
    with pytest.raises(VitqError, match="integer codes"):
        log2_attention_matmul(codes.float(), 0.7, v, 4)
    with pytest.raises(VitqError, match=">= 0"):
        log_sqrt2_attention_matmul(codes - 20, 0.7, v, 4)


def test_shift_kernel_odd_partial_sum_is_scaled_by_sqrt2_once():
    """Hand example at Δ = 1: codes [0, 1, 2, 3] are the levels 1, 2^−½, 2^−1, 2^−1.5."""
    v = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    out = log_sqrt2_attention_matmul(codes, 1.0, v, 2)
    even, odd = 1 + 0.5, 0.5 + 0.25  # odd code 2m−1 → 2^−m, then ·√2
    assert math.isclose(float(out), even + math.sqrt(2) * odd, rel_tol=1e-7)


# ------------------------------------------------------------------ bad options


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_bits(kind, bits):
    with pytest.raises(VitqError, match="bits"):
        KINDS[kind][0](bits)
    with pytest.raises(VitqError):
        build_quantizer({"kind": kind, "bits": bits})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"search_percentiles": [0.4]}, "percentiles"),
        ({"search_percentiles": [1.5]}, "percentiles"),
        ({"fixed_scales": [0.0]}, "fixed scales"),
        ({"fixed_scales": [float("nan")]}, "fixed scales"),
        ({"search_percentiles": [], "fixed_scales": []}, "at least one"),
        ({"search_percentiles": ["x"]}, "sequences"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(VitqError, match=match):
        LogSqrt2Quantizer(4, **kwargs)
    with pytest.raises(VitqError, match=match):
        build_quantizer({"kind": "log2", "bits": 4, **kwargs})
    with pytest.raises(VitqError, match="bad options"):
        build_quantizer({"kind": "log2", "bits": 4, "granularity": "channel"})
