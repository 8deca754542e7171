"""Tests of NoisyQuant: the noisy-bias quantizer (closed forms, the bias fold) and the ``noisyquant`` method."""

import pytest
import torch
import torch.nn.functional as F
from helpers import quantized_test_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq
from vitq.calib.search import search_by_output_error
from vitq.errors import VitqError
from vitq.export.onnx import export_onnx
from vitq.quantizers import build_quantizer
from vitq.quantizers.uniform import fake_quant

pytestmark = pytest.mark.usefixtures("one_thread")


def _gelu_like(seed: int, tokens: int = 64, channels: int = 32) -> torch.Tensor:
    """Heavy-tailed, GELU-shaped activations."""
    generator = torch.Generator().manual_seed(seed)
    return F.gelu(torch.randn(tokens, channels, generator=generator) * torch.linspace(0.5, 4, channels))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 1000))
def test_fake_quant_is_uniform_of_shifted_input_minus_noise(bits, seed):
    x = _gelu_like(seed)
    quantizer = build_quantizer({"kind": "noisy_uniform", "bits": bits, "init": "minmax"})
    candidates = quantizer.search_candidates(x)
    quantizer.set_params(candidates[-1])  # the widest noise
    noise = quantizer.noise
    assert noise.shape == (x.shape[-1],) and noise.abs().max() > 0
    expected = fake_quant(x + noise, quantizer.scale, quantizer.zero_point, quantizer.q_min, quantizer.q_max) - noise
    torch.testing.assert_close(quantizer(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(quantizer.dequantize(quantizer.int_repr(x)), quantizer(x), atol=1e-6, rtol=0)
    codes = quantizer.int_repr(x)
    assert codes.min() >= quantizer.q_min and codes.max() <= quantizer.q_max
    # idempotent up to the noise: re-quantizing a dequantized value gives the same codes
    assert torch.equal(quantizer.int_repr(quantizer(x)), codes)


def test_noise_folds_into_the_next_bias():
    """W·(Q(x + N) − N) + b  ==  W·Q(x + N) + (b − W·N): deployment needs only an ordinary uniform code."""
    x = _gelu_like(0)
    weight, bias = torch.randn(16, 32), torch.randn(16)
    quantizer = build_quantizer({"kind": "noisy_uniform", "bits": 4, "init": "minmax"})
    quantizer.set_params(quantizer.search_candidates(x)[-1])
    folded_bias = bias - weight @ quantizer.noise
    shifted = fake_quant(x + quantizer.noise, quantizer.scale, quantizer.zero_point, quantizer.q_min,
                         quantizer.q_max)
    torch.testing.assert_close(F.linear(quantizer(x), weight, bias), F.linear(shifted, weight, folded_bias),
                               atol=1e-4, rtol=1e-5)


def test_zero_amplitude_is_plain_uniform_and_calibrate_uses_it():
    x = _gelu_like(1)
    noisy = build_quantizer({"kind": "noisy_uniform", "bits": 4, "init": "mse"})
    plain = build_quantizer({"kind": "uniform", "bits": 4, "init": "mse"})
    noisy.calibrate(x)
    plain.calibrate(x)
    assert not noisy.noise.any()
    torch.testing.assert_close(noisy(x), plain(x), atol=0, rtol=0)


def test_search_picks_the_smallest_output_error():
    x = _gelu_like(2, tokens=256)
    weight = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    quantizer = build_quantizer({"kind": "noisy_uniform", "bits": 3, "init": "mse",
                                 "amplitudes": [0.0, 0.5, 1.0, 2.0]})
    chosen = search_by_output_error(quantizer, x, lambda a: F.linear(a, weight))
    errors = []
    for candidate in quantizer.search_candidates(x):  # an independent loop over the same candidates
        quantizer.set_params(candidate)
        errors.append(((F.linear(quantizer(x), weight) - F.linear(x, weight)) ** 2).sum().item())
    best = min(range(len(errors)), key=errors.__getitem__)
    assert torch.equal(chosen["noise"], quantizer.search_candidates(x)[best]["noise"])
    assert errors[best] <= errors[0]  # never worse than no noise


def test_bad_options_are_readable():
    with pytest.raises(VitqError, match="amplitudes"):
        build_quantizer({"kind": "noisy_uniform", "bits": 4, "amplitudes": [-1.0]})
    with pytest.raises(VitqError, match="per tensor"):
        build_quantizer({"kind": "noisy_uniform", "bits": 4, "granularity": "channel"})


def test_noisyquant_method_on_a_tiny_vit(tmp_path):
    model, images, qmodel = quantized_test_vit("noisyquant", 4, 4)
    noisy = {name: q for name, q in qmodel.quantizers().items() if q.kind == "noisy_uniform"}
    assert sorted(noisy) == [f"blocks.{i}.mlp.fc2.input_quantizer" for i in range(6)]
    path = vitq.save(qmodel, tmp_path / "noisy.safetensors")
    with torch.no_grad():
        assert torch.equal(vitq.load(path)(images), qmodel(images))
    exported = export_onnx(qmodel, tmp_path / "noisy.onnx")
    assert {p.slot for p in exported.float_points} >= set(noisy)


def test_search_candidates_install_nothing():
    quantizer = build_quantizer({"kind": "noisy_uniform", "bits": 4, "init": "mse"})
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    quantizer.calibrate(x)
    before = quantizer.get_params()
    candidates = quantizer.search_candidates(3 * x + 1)
    assert len(candidates) == len(quantizer.amplitudes)
    assert all(torch.equal(value, quantizer.get_params()[name]) for name, value in before.items())
