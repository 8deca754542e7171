"""Tests of PTQ4ViT's twin uniform quantizers (post-Softmax and post-GELU) against a per-element Python loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.errors import VitqError
from vitq.quantizers import build_quantizer
from vitq.quantizers.twin_uniform import GELU_MIN

pytestmark = pytest.mark.usefixtures("one_thread")


def _probabilities(seed: int, rows: int = 6, cols: int = 20) -> torch.Tensor:
    """Softmax rows with a few large and many tiny values, plus the exact edge values 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, generator=generator) * 4
    return torch.cat([logits.softmax(dim=-1).flatten(), torch.tensor([0.0, 1.0])])


def _gelu_outputs(seed: int, n: int = 120) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.gelu(torch.randn(n, generator=generator) * 3)


def _softmax_reference(values: torch.Tensor, bits: int, split: float) -> tuple[list[int], list[float]]:
    """Codes and levels of the post-Softmax twin quantizer, element by element."""
    half = 2 ** (bits - 1)
    top = half - 1
    codes, levels = [], []
    for v in values.tolist():
        if v <= split:
            c = min(max(round(v * top / split), 0), top)
            codes.append(c)
            levels.append(c * split / top)
        else:
            c = min(max(round(v * top), 0), top)
            codes.append(half + c)
            levels.append(c / top)
    return codes, levels


def _gelu_reference(values: torch.Tensor, bits: int, pos_step: float) -> tuple[list[int], list[float]]:
    """Codes and levels of the post-GELU twin quantizer, element by element."""
    half = 2 ** (bits - 1)
    neg_step = GELU_MIN / half
    codes, levels = [], []
    for v in values.tolist():
        if v < 0:
            c = min(max(round(v / neg_step), -half), 0)
            codes.append(c)
            levels.append(c * neg_step)
        else:
            c = min(max(round(v / pos_step), 0), half - 1)
            codes.append(c)
            levels.append(c * pos_step)
    return codes, levels


def _softmax_quantizer(bits: int, exponent: int):
    quantizer = build_quantizer({"kind": "twin_uniform_softmax", "bits": bits})
    quantizer.set_params({"split": torch.tensor([2.0**-exponent])})
    return quantizer


def _gelu_quantizer(bits: int, pos_step: float, grid: str = "pow2"):
    quantizer = build_quantizer({"kind": "twin_uniform_gelu", "bits": bits, "grid": grid})
    quantizer.set_params({"pos_step": torch.tensor([pos_step])})
    return quantizer


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), exponent=st.integers(0, 19), seed=st.integers(0, 10_000))
def test_softmax_twin_matches_the_loop_and_is_a_quantizer(bits, exponent, seed):
    x = _probabilities(seed)
    quantizer = _softmax_quantizer(bits, exponent)
    codes, levels = _softmax_reference(x.double(), bits, 2.0**-exponent)
    out = quantizer(x)
    assert quantizer.int_repr(x).tolist() == codes
    torch.testing.assert_close(out.double(), torch.tensor(levels, dtype=torch.float64), atol=1e-7, rtol=1e-6)
    assert torch.equal(quantizer.dequantize(quantizer.int_repr(x)), out)
    assert torch.equal(quantizer(out), out)  # idempotent
    assert out.min() >= 0 and out.max() <= 1
    codes = quantizer.int_repr(x)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert out.unique().numel() <= 2**bits


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), m=st.integers(0, 10), seed=st.integers(0, 10_000))
def test_gelu_twin_matches_the_loop_and_is_a_quantizer(bits, m, seed):
    x = _gelu_outputs(seed)
    half = 2 ** (bits - 1)
    pos_step = GELU_MIN / half * 2**m
    quantizer = _gelu_quantizer(bits, pos_step)
    codes, levels = _gelu_reference(x.double(), bits, pos_step)
    out = quantizer(x)
    assert quantizer.int_repr(x).tolist() == codes
    torch.testing.assert_close(out.double(), torch.tensor(levels, dtype=torch.float64), atol=1e-6, rtol=1e-6)
    assert torch.equal(quantizer.dequantize(quantizer.int_repr(x)), out)
    assert torch.equal(quantizer(out), out)  # idempotent
    assert out.min() >= -GELU_MIN - 1e-6 and out.max() <= (half - 1) * pos_step + 1e-6
    codes = quantizer.int_repr(x)
    assert codes.min() >= -half and codes.max() <= half - 1  # one signed b-bit code
    assert out.unique().numel() <= 2**bits


def test_softmax_split_is_the_boundary_of_the_fine_range():
    quantizer = _softmax_quantizer(4, 3)  # s = 1/8, Δ_lo = 1/56, Δ_hi = 1/7
    x = torch.tensor([1 / 8, 0.126, 0.5, 1 / 56 * 3.4])
    torch.testing.assert_close(quantizer(x), torch.tensor([1 / 8, 1 / 7, 4 / 7, 3 / 56]))
    assert quantizer.int_repr(x).tolist() == [7, 8 + 1, 8 + 4, 3]


def test_candidates():
    softmax = build_quantizer({"kind": "twin_uniform_softmax", "bits": 6})
    assert [float(c["split"]) for c in softmax.search_candidates(torch.rand(10))] == [2.0**-i for i in range(20)]
    x = _gelu_outputs(0) * 3
    top = float(x.max()) * 1.2 / (2**5 - 0.5)
    pow2 = build_quantizer({"kind": "twin_uniform_gelu", "bits": 6}).search_candidates(x)
    steps = [float(c["pos_step"]) for c in pow2]
    neg_step = GELU_MIN / 2**5
    assert steps[0] == pytest.approx(neg_step)
    assert all(s / neg_step == pytest.approx(2**m) for m, s in enumerate(steps))
    assert steps[-1] >= top > steps[-2]  # up to the first power of two covering PTQ4ViT's widest step
    linear = build_quantizer({"kind": "twin_uniform_gelu", "bits": 6, "grid": "linear", "eq_n": 7})
    steps = [float(c["pos_step"]) for c in linear.search_candidates(x)]
    expected = torch.linspace(0.01, 1.2, 7, dtype=torch.float64) * float(x.max()) / (2**5 - 0.5)
    torch.testing.assert_close(torch.tensor(steps, dtype=torch.float64), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["twin_uniform_softmax", "twin_uniform_gelu"])
def test_calibrate_picks_the_smallest_squared_error(kind):
    x = _probabilities(1) if kind == "twin_uniform_softmax" else _gelu_outputs(1) * 2
    quantizer = build_quantizer({"kind": kind, "bits": 4})
    quantizer.calibrate(x)
    chosen = quantizer.get_params()
    errors = []
    for params in quantizer.search_candidates(x):
        quantizer.set_params(params)
        errors.append(float((quantizer(x) - x).double().square().sum()))
    best = quantizer.search_candidates(x)[min(range(len(errors)), key=errors.__getitem__)]
    assert all(torch.equal(chosen[name], best[name]) for name in chosen)
    assert min(errors) < math.inf


@pytest.mark.parametrize("spec, message", [
    ({"kind": "twin_uniform_gelu", "bits": 4, "grid": "log"}, "grid must be one of"),
    ({"kind": "twin_uniform_gelu", "bits": 4, "eq_n": 0}, "eq_n must be an integer"),
    ({"kind": "twin_uniform_softmax", "bits": 4, "split_exponents": []}, "non-empty"),
    ({"kind": "twin_uniform_softmax", "bits": 4, "split_exponents": ["x"]}, "must be integers"),
    ({"kind": "twin_uniform_softmax", "bits": 9}, "bits must be"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(VitqError, match=message):
        build_quantizer(spec)
