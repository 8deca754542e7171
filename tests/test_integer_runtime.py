"""Tests of the integer-only kernels (against float references and closed forms) and the integer ViT runtime."""

import math

import pytest
import timm
import torch
from helpers import random_images
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq
from vitq.calib.runner import calibrating
from vitq.errors import VitqError
from vitq.export.integer_kernels import (
    EXP_BITS,
    PROB_BITS,
    dyadic,
    integer_layernorm,
    isqrt,
    requantize,
    shift_exp,
    shift_gelu,
    shiftmax,
    units_per_one,
)
from vitq.export.integer_vit import LEVEL_BITS, IntegerViT, SoftmaxLevels
from vitq.quantizers import build_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-6, 1e4))
def test_dyadic_multiplier_is_accurate(value):
    mantissa, shift = dyadic(value)
    assert 2 ** 29 <= int(mantissa) < 2 ** 30 + 1
    assert abs(int(mantissa) / 2 ** int(shift) - value) <= value * 2 ** -29


def test_requantize_rounds_like_float():
    acc = torch.arange(-5000, 5000, 7, dtype=torch.int64)
    multiplier = 0.0123456
    mantissa, shift = dyadic(multiplier)
    expected = torch.floor(acc.double() * multiplier + 0.5)  # round half up
    assert torch.equal(requantize(acc, mantissa, shift).double(), expected)
    clamped = requantize(acc, mantissa, shift, zero_point=3, q_min=0, q_max=15)
    assert torch.equal(clamped.double(), (expected + 3).clamp(0, 15))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2 ** 50), min_size=1, max_size=20))
def test_isqrt_is_the_exact_integer_square_root(values):
    roots = isqrt(torch.tensor(values, dtype=torch.int64))
    assert roots.tolist() == [math.isqrt(v) for v in values]


def test_shift_exp_follows_its_formula_and_stays_near_exp():
    scale = 0.01
    shift, units = units_per_one(scale)
    codes = -torch.arange(0, 2000, dtype=torch.int64) << shift
    x = codes.double() / units
    result = shift_exp(codes, units).double() / 2 ** EXP_BITS
    # the approximation itself, in floats: log2(e) ≈ 1.4375, 2^(−r) ≈ 1 − r/2
    t = -x * 1.4375
    reference = 2.0 ** -torch.floor(t) * (1 - (t - torch.floor(t)) / 2)
    assert (result - reference).abs().max() < 2e-3
    assert ((result - torch.exp(x)).abs() / torch.exp(x))[x > -8].max() < 0.1  # I-ViT's few-% approximation


def test_shiftmax_rows_sum_to_one_and_track_softmax():
    scores = torch.randn(4, 3, 50, 50, generator=torch.Generator().manual_seed(0)) * 3
    scale = 0.01
    shift, units = units_per_one(scale)
    codes = torch.round(scores / scale).to(torch.int64) << shift
    probabilities = shiftmax(codes, units).double() / 2 ** PROB_BITS
    assert (probabilities.sum(-1) - 1).abs().max() < 50 * 2 ** -PROB_BITS  # one rounding per entry
    assert (probabilities - scores.double().softmax(-1)).abs().max() < 0.05


def test_shift_gelu_tracks_gelu():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    scale = 0.003
    shift, units = units_per_one(scale)
    codes = torch.round(x / scale).to(torch.int64) << shift
    result = shift_gelu(codes, units).double() / units / 2 ** PROB_BITS
    assert (result - torch.nn.functional.gelu(x)).abs().max() < 0.05


def test_integer_layernorm_matches_float_layernorm():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 64, generator=generator, dtype=torch.float64) * 3 + 1
    gamma = torch.rand(64, generator=generator, dtype=torch.float64) + 0.5
    beta = torch.randn(64, generator=generator, dtype=torch.float64) * 0.1
    s_in, s_out, zero = 1e-4, 0.02, 128
    codes = torch.round(x / s_in).to(torch.int64)
    gain = torch.round(gamma / s_out * 2 ** 16).to(torch.int64)
    offset = (torch.round(beta / s_out) + zero).to(torch.int64)
    out = integer_layernorm(codes, gain, 16, offset, round(1e-6 / s_in ** 2), 0, 255)
    reference = torch.nn.functional.layer_norm(x, (64,), gamma, beta, eps=1e-6) / s_out + zero
    assert (out.double() - reference.clamp(0, 255)).abs().max() <= 1.0  # at most one code off (rounding)


# ---------------------------------------------------------------- the runtime on timm's tiny test_vit


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return random_images(8)


@pytest.mark.parametrize(("kind", "steps_per_octave"), [("log_sqrt2", 2), ("log2", 1)])
def test_log_softmax_levels_are_the_shift_kernel_in_fixed_point(kind, steps_per_octave):
    quantizer = build_quantizer({"kind": kind, "bits": 4})
    with calibrating([quantizer]):
        quantizer(torch.rand(4, 50).softmax(-1))
    levels = SoftmaxLevels(quantizer, "softmax")
    probabilities = torch.arange(0, 2**PROB_BITS + 1, 97)
    got = levels(probabilities).double() * levels.unit
    # the closed form: code q = round(−s·log2(p/Δ)) clamped to 0..15, level Δ·2^(−q/s), 0 past the last code
    delta, p = float(quantizer.scale), probabilities.double() / 2**PROB_BITS
    code = torch.round(-steps_per_octave * torch.log2(p / delta)).clamp_min(0)
    expected = torch.where(code >= 16, 0.0, delta * 2.0 ** (-code / steps_per_octave))
    assert torch.allclose(got, expected, rtol=0, atol=levels.unit / 2 + 1e-12)
    assert levels.unit == pytest.approx(delta / 2**LEVEL_BITS)


def test_softmax_levels_refuse_a_quantizer_without_integer_codes():
    quantizer = build_quantizer({"kind": "uniform", "bits": 8, "granularity": "head", "groups": 2, "axis": 1})
    with calibrating([quantizer]):
        quantizer(torch.rand(1, 2, 5, 5))
    with pytest.raises(VitqError, match="integer runtime: softmax must be a per-tensor uniform quantizer or one "
                                        "with integer codes"):
        SoftmaxLevels(quantizer, "softmax")


@pytest.mark.parametrize(("method", "deploy"), [("percentile", None), ("repq-vit", "onnxruntime"),
                                                ("dopq-vit", "onnxruntime")])
def test_integer_runtime_tracks_the_fake_quant_model(float_model, images, method, deploy):
    qmodel = vitq.quantize(float_model, vitq.QuantConfig(method=method, w_bits=8, a_bits=8, calib_size=4,
                                                         deploy=deploy), images[:4], progress=False)
    runtime = IntegerViT.compile(qmodel, images[:4])
    logits = runtime(images)
    assert logits.dtype == torch.int64
    with torch.no_grad():
        reference = qmodel(images)
    values = logits.double() * float(runtime.head.acc_scale.min())  # the logits' common scale
    correlation = torch.corrcoef(torch.stack([values.flatten(), reference.double().flatten()]))[0, 1]
    assert correlation > 0.95
    assert (values.argmax(1) == reference.argmax(1)).float().mean() >= 0.75


def test_integer_runtime_refuses_fractional_zero_points(float_model, images):
    qmodel = vitq.quantize(float_model, vitq.QuantConfig(method="repq-vit", w_bits=8, a_bits=8, calib_size=4),
                           images[:4], progress=False)
    with pytest.raises(VitqError, match="integer runtime: blocks.0.*fractional zero point"):
        IntegerViT.compile(qmodel, images[:4])


def test_integer_runtime_refuses_quantized_layernorm_inputs(float_model, images):
    config = vitq.QuantConfig(method="fqvit", w_bits=8, a_bits=8, calib_size=4,  # PTF on LayerNorm inputs
                              overrides=[vitq.PointOverride.parse("blocks.*.attn.softmax=uniform:8")])
    qmodel = vitq.quantize(float_model, config, images[:4], progress=False)
    with pytest.raises(VitqError, match="LayerNorm input"):
        IntegerViT.compile(qmodel, images[:4])


def test_integer_runtime_refuses_swin_with_one_line():
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=(1, 1),
                             num_heads=(1, 2)).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    qmodel = vitq.quantize(swin, vitq.QuantConfig(method="minmax", calib_size=2), images, progress=False)
    with pytest.raises(VitqError, match="only ViT/DeiT models with one class token"):
        IntegerViT.compile(qmodel, images)


@pytest.mark.parametrize(("extra", "message"), [({"pre_norm": True}, "norm_pre"), ({"init_values": 1e-3}, "LayerScale"),
                                                ({"qk_norm": True}, "qk-norm")])
def test_integer_runtime_refuses_vit_parts_its_blocks_do_not_compute(extra, message, images):
    model = timm.create_model("test_vit", pretrained=False, **extra).eval()
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="minmax", calib_size=2), images[:2], progress=False)
    with pytest.raises(VitqError, match=message):
        IntegerViT.compile(qmodel, images[:2])
