"""Tests of ``q-hyvit``: the asymmetric range grid (against its closed form), the per-layer configuration choice
(against a loop over the configurations searched one by one), the bridge-block rule, and the method end to end
(save/load, and ``select=false`` being PTQ4ViT)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import quantized_test_vit

import vitq
from vitq.methods.ptq4vit.hessian import asymmetric_range_candidates
from vitq.methods.ptq4vit.products import LinearProduct
from vitq.methods.q_hyvit import _asymmetric, _search, is_bridge
from vitq.nn import QLinear
from vitq.quantizers import build_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _symmetric(bits: int, **granularity) -> dict:
    return {"kind": "uniform", "bits": bits, "signed": True, "symmetric": True, "init": "minmax",
            "granularity": "tensor", **granularity}


def test_asymmetric_candidates_are_scaled_min_max_ranges():
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) + torch.arange(5.0)[:, None]
    quantizer = build_quantizer(_asymmetric(4, granularity="channel", axis=0))
    candidates = asymmetric_range_candidates(quantizer, x, 7)
    assert len(candidates) == 7
    factors = torch.linspace(0.01, 1.2, 7, dtype=torch.float64)
    for f, params in zip(factors.tolist(), candidates, strict=True):
        for row in range(5):
            lo, hi = f * x[row].min().item(), f * x[row].max().item()
            step = (hi - lo) / 15
            assert params["scale"][row].item() == pytest.approx(step, rel=1e-5)
            assert params["zero_point"][row].item() == -round(lo / step)


def _product(x_offset: float, seed: int = 0):
    """A Linear point with random weights whose input is ``x_offset`` + |noise| (one-signed when the offset is 0)."""
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(12, 6)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(6, 12, generator=gen) * torch.linspace(0.05, 2, 6)[:, None])
    point = QLinear(linear, "act")
    point.weight_quantizer, point.input_quantizer = build_quantizer(_symmetric(4)), build_quantizer(_symmetric(4))
    x = torch.randn(64, 12, generator=gen).abs() + x_offset
    grad = torch.randn(64, 6, generator=gen)
    return LinearProduct("fc", point, row_stride=1), x, linear.weight.detach(), grad


def _layer_error(product, x, w, grad) -> float:
    out = F.linear(product.a_quantizer.quantize_dequantize(x), product.b_quantizer.quantize_dequantize(w))
    return float(((out - F.linear(x, w)) * grad).square().sum())


WEIGHT_SPECS = [_symmetric(4), _asymmetric(4), _symmetric(4, granularity="channel", axis=0),
                _asymmetric(4, granularity="channel", axis=0)]
INPUT_SPECS = [_symmetric(4), _asymmetric(4)]


def test_the_chosen_configuration_is_the_best_of_a_loop_over_them():
    product, x, w, grad = _product(0.0)
    _search(product, x, w, grad, WEIGHT_SPECS, INPUT_SPECS, eq_n=12)
    chosen = _layer_error(product, x, w, grad)
    chosen_specs = (product.b_quantizer.spec(), product.a_quantizer.spec())
    # an independent loop: every (weight, input) pair searched alone; the sequential choice (weights, then input)
    # must match the best input for the chosen weights, and beat every weight layout with a symmetric input
    errors = {}
    for wi, w_spec in enumerate(WEIGHT_SPECS):
        for ai, a_spec in enumerate(INPUT_SPECS):
            alone, *_ = _product(0.0)
            _search(alone, x, w, grad, [w_spec], [a_spec], eq_n=12)
            errors[wi, ai] = _layer_error(alone, x, w, grad)
    best_weight = min(range(len(WEIGHT_SPECS)), key=lambda wi: errors[wi, 0])
    assert chosen == pytest.approx(min(errors[best_weight, ai] for ai in range(2)), rel=1e-9)
    assert chosen_specs[0]["granularity"] == "channel"  # weight rows span 40x: one step per row wins
    assert chosen_specs[1]["symmetric"] is False  # a one-signed input: the asymmetric scheme wins


def test_the_choice_is_installed_in_the_layer():
    product, x, w, grad = _product(-1.0)  # |noise| - 1: both signs
    _search(product, x, w, grad, WEIGHT_SPECS, INPUT_SPECS, eq_n=12)
    assert product.module.input_quantizer is product.a_quantizer  # the choice is installed in the layer too
    assert product.module.weight_quantizer is product.b_quantizer


def test_vit_stages_are_not_bridges():
    _, _, qmodel = quantized_test_vit("minmax", 8, 8)
    assert not any(is_bridge(qmodel, stage) for stage in qmodel.stages())


def test_select_false_is_ptq4vit():
    _, images, plain = quantized_test_vit("q-hyvit", 6, 6, select=False, eq_n=6)
    _, _, ptq4vit = quantized_test_vit("ptq4vit", 6, 6, eq_n=6)
    assert plain.quant_specs() == ptq4vit.quant_specs()
    with torch.no_grad():
        assert torch.equal(plain(images), ptq4vit(images))


def test_q_hyvit_chooses_layouts_and_round_trips(tmp_path):
    model, images, qmodel = quantized_test_vit("q-hyvit", 6, 6, eq_n=6)
    specs = qmodel.quant_specs()
    weights = {name: spec for name, spec in specs.items() if name.endswith("weight_quantizer") and spec}
    assert {(s["granularity"], s["symmetric"]) for s in weights.values()} <= {
        ("tensor", True), ("tensor", False), ("head", True), ("head", False), ("channel", True), ("channel", False)}
    assert specs["blocks.0.attn.softmax.quantizer"]["kind"] == "twin_uniform_softmax"  # PTQ4ViT's, kept
    loaded = vitq.load(vitq.save(qmodel, tmp_path / "q.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(images), qmodel(images))
        reference = model(images)
        assert ((qmodel(images) - reference).square().mean() / reference.var()) < 0.05
