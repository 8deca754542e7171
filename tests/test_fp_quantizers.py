"""Tests of the floating-point quantizer kinds (vitq.quantizers.fp): FP8/FP4 rounding against torch's float8 casts
and a plain loop over the E2M1 values, the MX and NVFP4 block scales against per-block loops, overrides, saving
and export."""

import math

import pytest
import torch
from helpers import random_images, randomize_norms
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq
from vitq.config import PointOverride
from vitq.errors import VitqError
from vitq.export.onnx import export_onnx
from vitq.quantizers import build_quantizer
from vitq.quantizers.fp import E2M1, E4M3, E5M2, round_to_format, searched_format

FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # by code: an even code has an even mantissa


@settings(max_examples=300, deadline=None)
@given(st.lists(FINITE, min_size=1, max_size=64))
def test_fp8_rounding_equals_torchs_float8_casts(values):
    x = torch.tensor(values, dtype=torch.float32)
    for fmt, dtype in ((E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)):
        # torch's cast rounds to nearest even but does not saturate: compare on the clamped values
        expected = x.clamp(-fmt.max, fmt.max).to(dtype).float()
        torch.testing.assert_close(round_to_format(x, fmt), expected, rtol=0, atol=0)


def _nearest_e2m1(value: float) -> float:
    """The plain-loop reference: the nearest E2M1 magnitude, the even code on a tie, the sign copied."""
    distances = [abs(abs(value) - m) for m in E2M1_MAGNITUDES]
    best = min(distances)
    codes = [code for code, d in enumerate(distances) if d == best]
    code = codes[0] if len(codes) == 1 else next(c for c in codes if c % 2 == 0)
    return math.copysign(E2M1_MAGNITUDES[code], value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=-9, max_value=9, allow_nan=False, width=32), min_size=1, max_size=64))
def test_fp4_rounding_equals_the_nearest_value_loop(values):
    x = torch.tensor(values, dtype=torch.float32)
    expected = torch.tensor([_nearest_e2m1(v) for v in x.tolist()])
    torch.testing.assert_close(round_to_format(x, E2M1), expected, rtol=0, atol=0)


def _representable(fmt) -> torch.Tensor:
    """Every finite value of ``fmt``: all 256 float8 bit patterns read by torch, or the E2M1 code book."""
    if fmt is E2M1:
        return torch.tensor([sign * m for sign in (1.0, -1.0) for m in E2M1_MAGNITUDES])
    dtype = torch.float8_e4m3fn if fmt is E4M3 else torch.float8_e5m2
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return values[values.isfinite()]


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1], ids=lambda f: f.name)
def test_every_representable_value_round_trips(fmt):
    values = _representable(fmt)
    assert values.abs().max() == fmt.max
    torch.testing.assert_close(round_to_format(values, fmt), values, rtol=0, atol=0)


def test_infinities_saturate_and_nan_propagates():
    for fmt in (E4M3, E5M2, E2M1):
        out = round_to_format(torch.tensor([math.inf, -math.inf, math.nan]), fmt)
        assert out[:2].tolist() == [fmt.max, -fmt.max] and out[2].isnan()


def test_formats_have_their_published_ranges():
    assert (E4M3.bits, E5M2.bits, E2M1.bits) == (8, 8, 4)
    assert round_to_format(torch.tensor([1e9, 2.0**-9, 2.0**-10]), E4M3).tolist() == [448.0, 2.0**-9, 0.0]
    assert round_to_format(torch.tensor([1e9, 2.0**-16]), E5M2).tolist() == [57344.0, 2.0**-16]


@pytest.mark.parametrize("kind", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_scaled_format_quantizer_maps_the_range_onto_the_format(kind):
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.logspace(-2, 1, 6)[:, None]
    quantizer = build_quantizer({"kind": kind, "granularity": "channel"})
    quantizer.calibrate(w)
    fmt = quantizer.fmt
    assert quantizer.scale.shape == (6,) and quantizer.bits == fmt.bits
    out = quantizer(w)
    scale = quantizer.scale[:, None]
    torch.testing.assert_close(round_to_format(out / scale, fmt), out / scale)  # on the grid
    torch.testing.assert_close(out.abs().amax(1), w.abs().amax(1))  # max|w| is the format's max, exactly
    searched = build_quantizer({"kind": kind, "granularity": "channel", "init": "mse"})
    searched.calibrate(w)
    assert ((searched(w) - w).square().sum(1) <= (out - w).square().sum(1) + 1e-12).all()


def _block_reference(x: torch.Tensor, block: int, scale_of) -> torch.Tensor:
    """Per-block loop: each block of the last dimension scaled by ``scale_of(max|block|)`` and rounded to E2M1/E4M3
    elements by the caller's scale rule."""
    out = torch.zeros_like(x)
    for row in range(x.shape[0]):
        for start in range(0, x.shape[1], block):
            values = x[row, start:start + block]
            scale, fmt = scale_of(float(values.abs().max()))
            out[row, start:start + block] = 0.0 if scale == 0 else round_to_format(values / scale, fmt) * scale
    return out


@pytest.mark.parametrize(("kind", "fmt"), [("mxfp8", E4M3), ("mxfp4", E2M1)])
def test_mx_block_scales_are_powers_of_two_from_each_block(kind, fmt):
    torch.manual_seed(1)
    x = torch.randn(3, 70) * torch.logspace(-3, 2, 70)  # 70: the last block is padded
    quantizer = build_quantizer({"kind": kind})
    quantizer.calibrate(x)  # nothing to calibrate
    emax = {E4M3: 8, E2M1: 2}[fmt]

    def scale_of(amax: float):
        return (0.0 if amax == 0 else 2.0 ** (math.floor(math.log2(amax)) - emax)), fmt

    torch.testing.assert_close(quantizer(x), _block_reference(x, 32, scale_of), rtol=0, atol=0)
    x2 = x.clone()
    x2[:, :32] *= 100  # another first block leaves the other blocks as they were
    torch.testing.assert_close(quantizer(x2)[:, 32:], quantizer(x)[:, 32:], rtol=0, atol=0)


def test_nvfp4_uses_e4m3_block_scales_under_a_calibrated_tensor_scale():
    torch.manual_seed(2)
    x = torch.randn(4, 48) * torch.logspace(-2, 1, 48)
    quantizer = build_quantizer({"kind": "nvfp4"})
    quantizer.calibrate(x)
    g = float(x.abs().max()) / (448 * 6)
    assert quantizer.global_scale.item() == pytest.approx(g, rel=1e-6)

    def scale_of(amax: float):  # the block scale through torch's own E4M3 cast
        stored = torch.tensor(amax / (6 * quantizer.global_scale.item())).to(torch.float8_e4m3fn).float().item()
        return stored * quantizer.global_scale.item(), E2M1

    torch.testing.assert_close(quantizer(x), _block_reference(x, 16, scale_of), rtol=1e-6, atol=0)


def test_overrides_to_a_format_take_its_bits_and_refuse_others(float_model):
    images = random_images(4)
    config = vitq.QuantConfig(method="percentile", w_bits=4, a_bits=4, calib_size=2,
                              overrides=[PointOverride.parse("blocks.*.mlp.fc1=fp8_e4m3"),
                                         PointOverride.parse("blocks.*.mlp.fc2=nvfp4")])
    qmodel = vitq.quantize(float_model, config, images[:2], progress=False)
    fc1, fc2 = qmodel.model.blocks[0].mlp.fc1, qmodel.model.blocks[0].mlp.fc2
    assert fc1.weight_quantizer.kind == "fp8_e4m3" and fc1.weight_quantizer.bits == 8
    assert fc1.weight_quantizer.granularity == "channel" and fc1.input_quantizer.granularity == "tensor"
    assert fc2.input_quantizer.kind == "nvfp4" and fc2.input_quantizer.bits == 4
    assert qmodel.model.blocks[0].attn.qkv.weight_quantizer.kind == "uniform"
    bad = config.model_copy(update={"overrides": [PointOverride.parse("blocks.*.mlp.fc1=fp8_e4m3:4")]})
    with pytest.raises(VitqError, match="'fp8_e4m3' has 8 bits"):
        vitq.prepare(float_model, bad)
    with pytest.raises(VitqError, match="granularity of 'fp4_e2m1'"):
        build_quantizer({"kind": "fp4_e2m1", "granularity": "head"})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript ONNX exporter
def test_format_quantized_model_saves_loads_and_exports_on_a_float_path(float_model, tmp_path):
    images = random_images(4)
    overrides = [PointOverride.parse("*=mxfp4"), PointOverride.parse("*.weight_quantizer=fp8_e4m3")]
    config = vitq.QuantConfig(method="percentile", calib_size=2, overrides=overrides)
    qmodel = vitq.quantize(float_model, config, images[:2], progress=False)
    vitq.save(qmodel, tmp_path / "m.safetensors")
    loaded = vitq.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), qmodel(images), rtol=0, atol=0)
    exported = export_onnx(qmodel, tmp_path / "m.onnx")
    reasons = {p.slot: p.reason for p in exported.float_points}
    assert reasons["blocks.0.mlp.fc1.weight_quantizer"] == "fp8_e4m3 quantizer (not uniform)"
    assert reasons["blocks.0.mlp.fc1.input_quantizer"] == "mxfp4 quantizer (not uniform)"
    assert len(exported.float_points) == len(exported.points)


# ------------------------------------------------------------------------------- searched formats (LLM-FP4)
def _decoded(bits: int, e: int) -> list[float]:
    """Every non-negative value of the ``bits``-bit format with ``e`` exponent bits, decoded from its bit fields
    (every exponent code normal, bias 2^(e−1) − 1; exponent field 0: subnormals)."""
    m, bias = bits - 1 - e, 2 ** (e - 1) - 1
    values = []
    for field in range(2**e):
        for mantissa in range(2**m):
            if field == 0:
                values.append(2.0 ** (1 - bias) * mantissa / 2**m)
            else:
                values.append(2.0 ** (field - bias) * (1 + mantissa / 2**m))
    return sorted(values)


@pytest.mark.parametrize(("bits", "e"), [(4, 1), (4, 2), (4, 3), (6, 3), (8, 4), (8, 5), (8, 7)])
def test_searched_formats_are_their_decoded_code_books(bits, e):
    fmt = searched_format(bits, e)
    book = torch.tensor(_decoded(bits, e))
    assert fmt.max == float(book.max())
    values = torch.cat([book, -book])
    torch.testing.assert_close(round_to_format(values, fmt), values, rtol=0, atol=0)
    # any value rounds to a nearest entry of the book (the plain search), saturating beyond the largest
    x = torch.linspace(-1.2 * fmt.max, 1.2 * fmt.max, 2001, dtype=torch.float64)
    clamped, got = x.abs().clamp(max=fmt.max), round_to_format(x, fmt)
    nearest = (clamped[:, None] - book.double()[None, :]).abs().min(1).values
    assert bool(torch.isin(got.abs(), book.double()).all())
    assert torch.allclose((got.abs() - clamped).abs(), nearest, rtol=1e-12, atol=0)


def test_format_search_picks_the_lowest_error_format():
    torch.manual_seed(0)
    uniform, heavy = torch.rand(4096) * 2 - 1, torch.distributions.StudentT(2.0).sample((4096,))
    errors = {}
    for name, x in (("uniform", uniform), ("heavy", heavy)):
        searched = build_quantizer({"kind": "fp", "bits": 4})
        searched.calibrate(x)
        for e in (1, 2, 3):  # each format alone, with the same scale search
            only = build_quantizer({"kind": "fp", "bits": 4, "exponent_candidates": [e]})
            only.calibrate(x)
            errors[name, e] = float((only(x) - x).square().sum())
        best = min((1, 2, 3), key=lambda e: errors[name, e])
        assert int(searched.exponent_bits) == best
        assert float((searched(x) - x).square().sum()) == errors[name, best]
    assert errors["uniform", 1] < errors["uniform", 3] and errors["heavy", 3] < errors["heavy", 1]
    e2m1 = build_quantizer({"kind": "fp4_e2m1", "init": "mse"})  # the same grid as the searched E2M1
    e2m1.calibrate(heavy)
    assert errors["heavy", 2] == pytest.approx(float((e2m1(heavy) - heavy).square().sum()))


def test_searched_format_options_are_checked():
    for spec, match in (({"exponent_candidates": [4]}, "1 to 3 exponent bits"),
                        ({"exponent_candidates": []}, "at least one"),
                        ({"exponent_candidates": [1.5]}, "integers"),
                        ({"granularity": "head"}, "granularity")):
        with pytest.raises(VitqError, match=match):
            build_quantizer({"kind": "fp", "bits": 4, **spec})


def test_llm_fp4_pre_shift_is_exact_in_float_and_saves_its_formats(float_model, tmp_path):
    model = randomize_norms(float_model)
    images = random_images(4)
    config = vitq.QuantConfig(method="llm-fp4", w_bits=4, a_bits=4, calib_size=4)
    qmodel = vitq.quantize(model, config, images, progress=False)
    norm, qkv = qmodel.model.blocks[0].norm1, qmodel.model.blocks[0].attn.qkv
    ratios = model.blocks[0].norm1.weight / norm.weight  # the folded 2^ρ per channel
    assert bool((torch.log2(ratios) == torch.log2(ratios).round()).all()) and ratios.max() > ratios.min()
    torch.testing.assert_close(qkv.weight, model.blocks[0].attn.qkv.weight * ratios, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), qmodel.quantization_disabled():
        torch.testing.assert_close(qmodel(images), model(images), rtol=1e-4, atol=1e-5)
    formats = {int(q.exponent_bits) for q in qmodel.quantizers().values()}
    assert formats <= {1, 2, 3}
    vitq.save(qmodel, tmp_path / "m.safetensors")
    loaded = vitq.load(tmp_path / "m.safetensors")
    assert [int(q.exponent_bits) for q in loaded.quantizers().values()] == \
        [int(q.exponent_bits) for q in qmodel.quantizers().values()]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), qmodel(images), rtol=0, atol=0)
