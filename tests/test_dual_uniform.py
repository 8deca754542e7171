"""The dual uniform weight quantizer (ERQ journal version, docs/methods/erq.md#dual-uniform-weights-journal-version)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.errors import VitqError
from vitq.quantizers import DualUniformQuantizer, UniformQuantizer, build_quantizer
from vitq.quantizers.dual_uniform import outlier_columns


def _weight(seed: int, rows: int = 40, cols: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    hot = torch.randperm(cols, generator=gen)[:3]
    w[:, hot] *= 8.0  # outlier input columns, as behind post-LayerNorm outlier channels
    return w


def _outliers_reference(w: torch.Tensor, count: int) -> set[int]:
    """Per row with numpy's percentile (linear interpolation, as torch.quantile), then a count per column."""
    a = w.double().numpy()
    counts = np.zeros(a.shape[1], dtype=int)
    for row in a:
        pos, neg = row[row > 0], row[row < 0]
        hi = np.percentile(pos, 99) if len(pos) else np.inf
        lo = np.percentile(neg, 1) if len(neg) else -np.inf
        counts += (row > hi) | (row < lo)
    order = sorted(range(a.shape[1]), key=lambda c: (-counts[c], c))
    return set(order[:count])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(0, 6))
def test_outlier_columns_match_a_per_row_reference(seed, count):
    w = _weight(seed)
    mask = outlier_columns(w, count)
    assert int(mask.sum()) == count
    assert set(torch.nonzero(mask)[:, 0].tolist()) == _outliers_reference(w, count)


def test_planted_outlier_columns_are_found():
    w = _weight(3)
    hot = set(torch.nonzero(w.abs().mean(0) > 4)[:, 0].tolist())
    assert set(torch.nonzero(outlier_columns(w, 3))[:, 0].tolist()) == hot


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), init=st.sampled_from(["minmax", "mse"]))
def test_codes_in_range_idempotent_and_each_part_is_a_per_row_uniform_quantizer(seed, bits, init):
    w = _weight(seed)
    q = DualUniformQuantizer(bits, init=init, outlier_ratio=0.1)  # 40 rows -> 4 outlier columns
    q.calibrate(w)
    codes = q.int_repr(w)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    out = q(w)
    torch.testing.assert_close(q.dequantize(codes), out, atol=0, rtol=0)
    torch.testing.assert_close(q(out), out, atol=0, rtol=0)
    mask = q.outlier_mask.bool()
    assert int(mask.sum()) == 4
    for part in (mask, ~mask):
        reference = UniformQuantizer(bits, granularity="channel", axis=0, init=init)
        reference.calibrate(w[:, part])
        torch.testing.assert_close(out[:, part], reference(w[:, part]), atol=0, rtol=0)


def test_two_scales_beat_one_on_outlier_columns():
    w = _weight(0)
    dual = DualUniformQuantizer(4, outlier_ratio=0.1)
    single = UniformQuantizer(4, granularity="channel", axis=0, init="mse")
    dual.calibrate(w)
    single.calibrate(w)
    assert (dual(w) - w).square().sum() < 0.5 * (single(w) - w).square().sum()


def test_state_round_trip_and_shape_check():
    w = _weight(1)
    q = build_quantizer({"kind": "dual_uniform", "bits": 4})
    q.calibrate(w)
    twin = build_quantizer(q.spec())
    twin.load_state_dict(q.state_dict())
    torch.testing.assert_close(twin(w), q(w), atol=0, rtol=0)
    with pytest.raises(VitqError, match="calibrated for 40 x 24"):
        q(torch.randn(40, 12))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, "a"])
def test_bad_outlier_ratio(ratio):
    with pytest.raises(VitqError, match="outlier_ratio"):
        DualUniformQuantizer(4, outlier_ratio=ratio)
