"""Tests of I&S-ViT's shift-uniform-log2 quantizer (vitq.quantizers.sulq) against its closed form."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.errors import VitqError
from vitq.quantizers import build_quantizer
from vitq.quantizers.sulq import SHIFTS


def _attention(seed: int, temperature: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 12, 12, generator=g) * temperature).softmax(-1)


def _reference(value: float, eta: float, log_min: float, log_step: float, bits: int) -> float:
    """One element, straight from the formula."""
    code = min(max(round((math.log2(value + eta) - log_min) / log_step), 0), 2**bits - 1)
    return 2.0 ** round(log_min + code * log_step) - eta


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 1000), temperature=st.floats(0.5, 8.0))
def test_matches_the_formula_and_its_codes(bits, seed, temperature):
    x = _attention(seed, temperature)
    quantizer = build_quantizer({"kind": "sulq", "bits": bits})
    quantizer.calibrate(x)
    eta, low, step = (float(getattr(quantizer, n)) for n in ("shift", "log_min", "log_step"))
    assert any(math.isclose(eta, candidate, rel_tol=1e-6) for candidate in SHIFTS)
    out = quantizer(x)
    flat = x.flatten()[:60].tolist()
    for value, got in zip(flat, out.flatten()[:60].tolist(), strict=True):
        assert got == pytest.approx(_reference(value, eta, low, step, bits), rel=1e-5, abs=1e-6)
    codes = quantizer.int_repr(x)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(quantizer.dequantize(codes), out)
    exponents = torch.log2(out + eta)
    assert torch.allclose(exponents, exponents.round(), atol=1e-4)  # every level is 2^k − η
    assert out.unique().numel() <= 2**bits


def test_calibration_keeps_the_shift_with_the_smallest_error():
    x = _attention(3)
    quantizer = build_quantizer({"kind": "sulq", "bits": 4})
    errors = []
    for params in quantizer.search_candidates(x):
        quantizer.set_params(params)
        errors.append(float((quantizer(x) - x).double().square().sum()))
    quantizer.calibrate(x)
    assert float(quantizer.shift) == pytest.approx(SHIFTS[errors.index(min(errors))], rel=1e-6)


def test_levels_start_at_zero_for_a_power_of_two_shift():
    x = torch.tensor([0.0, 1e-6, 0.3, 1.0])
    quantizer = build_quantizer({"kind": "sulq", "bits": 4, "shifts": [2.0 ** -10]})
    quantizer.calibrate(x)
    assert quantizer(x)[0].item() == 0.0 and quantizer(x)[-1].item() == pytest.approx(1.0, abs=2e-3)


def test_bad_shifts_are_named():
    with pytest.raises(VitqError, match="shifts"):
        build_quantizer({"kind": "sulq", "bits": 4, "shifts": [0.0]})
    with pytest.raises(VitqError, match="shifts"):
        build_quantizer({"kind": "sulq", "bits": 4, "shifts": "abc"})
