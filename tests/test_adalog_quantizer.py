"""Tests of AdaLog's adaptive-base log quantizer against its closed form (docs/methods/adalog.md)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.errors import VitqError
from vitq.quantizers import build_quantizer
from vitq.quantizers.adalog import GELU_SHIFT, R, adalog_table


def _softmax_like(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, 20, 20, generator=generator) * 3).softmax(-1)


def test_table_is_the_rounded_fraction():
    for bits in (3, 4, 6, 8):
        table = adalog_table(bits)
        denominator = 2 ** (bits + 1) - 2
        assert table[0] == 1.0 and torch.all(table[1:] <= table[:-1]) and table[-1] >= 0.5
        for j in (0, 5, 36):
            assert table[j].item() == round(2 ** (-j / R) * denominator) / denominator


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(3, 8), base=st.integers(10, 138), seed=st.integers(0, 500))
def test_levels_follow_the_shift_plus_table_form(bits, base, seed):
    quantizer = build_quantizer({"kind": "adalog", "bits": bits, "fixed_scale": 1.0, "bases": [base]})
    quantizer.calibrate(_softmax_like(seed))
    assert float(quantizer.base) == base and float(quantizer.scale) == 1.0
    codes = torch.arange(2**bits + 1, dtype=torch.int32)
    levels = quantizer.dequantize(codes)
    table = adalog_table(bits)
    for k in range(2**bits):
        expected = 2.0 ** -((k * base) // R) * table[(k * base) % R].item()
        assert math.isclose(levels[k].item(), expected, rel_tol=1e-6, abs_tol=1e-30)
        # within one table step of the exact level 2^(−k·q/r) (where float32 still has its full precision)
        exact = 2 ** (-k * base / R)
        if exact > 1e-30:
            assert abs(levels[k].item() - exact) <= exact / (2 ** (bits + 1) - 2) * (1 + 1e-5)
    assert levels[-1] == 0  # the zero code


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(4, 8), seed=st.integers(0, 500))
def test_codes_range_monotone_and_idempotent(bits, seed):
    x = _softmax_like(seed)
    quantizer = build_quantizer({"kind": "adalog", "bits": bits, "fixed_scale": 1.0, "bases": [10, 37, 80]})
    quantizer.calibrate(x)
    codes = quantizer.int_repr(x)
    assert codes.min() >= 0 and codes.max() <= 2**bits
    flat, flat_codes = x.flatten(), codes.flatten()
    order = flat.argsort()
    assert torch.all(flat_codes[order][1:] <= flat_codes[order][:-1])  # larger x, smaller (or equal) code
    assert torch.equal(quantizer(quantizer(x)), quantizer(x))
    assert quantizer.int_repr(torch.zeros(3)).tolist() == [2**bits] * 3


def test_calibrate_picks_the_best_base_of_an_exhaustive_loop():
    x = _softmax_like(7)
    quantizer = build_quantizer({"kind": "adalog", "bits": 4, "fixed_scale": 1.0})
    quantizer.calibrate(x)
    errors = {}
    for base in range(10, 139):
        probe = build_quantizer({"kind": "adalog", "bits": 4, "fixed_scale": 1.0, "bases": [base]})
        probe.calibrate(x)
        errors[base] = (probe(x) - x).square().sum().item()
    assert errors[int(quantizer.base)] == min(errors.values())


def test_shifted_form_for_post_gelu_values():
    x = torch.nn.functional.gelu(torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 2)
    quantizer = build_quantizer({"kind": "adalog", "bits": 4, "shift": GELU_SHIFT, "bases": [20, 37, 60]})
    quantizer.calibrate(x)
    out = quantizer(x)
    assert out.min() >= -GELU_SHIFT - 1e-6 and torch.isfinite(out).all()
    assert (out - x).square().mean() < x.square().mean() * 0.1
    assert len(quantizer.search_candidates(x)) == 3 * 3  # 3 scale quantiles x 3 bases


def test_bad_options_are_readable():
    with pytest.raises(VitqError, match="bases"):
        build_quantizer({"kind": "adalog", "bits": 4, "bases": []})
    with pytest.raises(VitqError, match="fixed_scale"):
        build_quantizer({"kind": "adalog", "bits": 4, "fixed_scale": -1.0})
    with pytest.raises(VitqError, match="shift"):
        build_quantizer({"kind": "adalog", "bits": 4, "shift": -0.1})
