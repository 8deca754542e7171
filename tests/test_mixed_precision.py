"""Tests of vitq.mixed_precision: the allocator (budget, determinism, greedy rule), budgets, override files, and the
per-bit sensitivities on a tiny random ViT."""

import pytest
import torch
from helpers import random_images
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq
from vitq.config import PointOverride, ReconConfig
from vitq.errors import VitqError
from vitq.methods.base import weight_sensitivity_config
from vitq.mixed_precision import (
    Budget,
    allocate,
    bit_sensitivities,
    overrides_text,
    point_sizes,
    read_overrides_file,
)

MENU = (2, 3, 4, 6, 8)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 12))
    costs = {f"p{i}": {b: draw(st.floats(0, 10, allow_nan=False)) for b in MENU} for i in range(n)}
    sizes = {f"p{i}": draw(st.integers(1, 1000)) for i in range(n)}
    low, high = 2 * sum(sizes.values()), 8 * sum(sizes.values())
    return costs, sizes, draw(st.floats(low, high + 100))


@settings(max_examples=200, deadline=None)
@given(problems())
def test_allocation_respects_the_budget_and_is_deterministic(problem):
    costs, sizes, budget = problem
    bits = allocate(costs, sizes, budget)
    assert list(bits) == list(costs) and set(bits.values()) <= set(MENU)
    assert sum(bits[p] * sizes[p] for p in bits) <= budget
    assert allocate(costs, sizes, budget) == bits
    if budget >= 8 * sum(sizes.values()):
        assert set(bits.values()) == {8}  # nothing to save: every point keeps the widest bit-width


def test_allocation_lowers_the_point_that_costs_least_per_bit_first():
    costs = {"robust": {4: 0.1, 8: 0.0}, "fragile": {4: 5.0, 8: 0.0}, "big": {4: 0.3, 8: 0.0}}
    sizes = {"robust": 10, "fragile": 10, "big": 100}
    # big saves 400 bits for 0.3 (7.5e-4 per bit), robust 40 bits for 0.1 (2.5e-3), fragile 40 for 5.0
    assert allocate(costs, sizes, 8 * 120 - 1) == {"robust": 8, "fragile": 8, "big": 4}
    assert allocate(costs, sizes, 8 * 120 - 401) == {"robust": 4, "fragile": 8, "big": 4}
    with pytest.raises(VitqError, match="below what the narrowest"):
        allocate(costs, sizes, 4 * 120 - 1)


def test_budgets_parse_and_count_bits():
    sizes = {"a": 100, "b": 300}
    assert Budget.parse("w-avg-bits=4.5").total_bits(sizes) == 4.5 * 400
    assert Budget.parse("w-size-mb=0.5").total_bits(sizes) == 4e6
    assert not Budget.parse("a-avg-bits=6").weights
    assert Budget.parse("w-avg-bits=5").describe({"a": 8, "b": 4}, sizes) == "5.000 mean bits (budget 5)"
    for bad in ("avg-bits=4", "w-avg-bits", "w-avg-bits=-1", "w-avg-bits=x", "w-size-mb=nan"):
        with pytest.raises(VitqError, match="KIND=VALUE"):
            Budget.parse(bad)


def test_bops_sizes_are_macs_times_input_bits(float_model):
    """Each layer's BOPs per weight bit, against its MACs from the model's dimensions."""
    config = vitq.QuantConfig(method="minmax", w_bits=4, a_bits=6, calib_size=2,
                              overrides=[PointOverride.parse("blocks.1.mlp.fc2.input_quantizer=float")])
    images = random_images(2)
    qmodel = vitq.quantize(float_model, config, images, progress=False)
    sizes = point_sizes(qmodel, images[:1], weights=True, bops=True)
    tokens = float_model.patch_embed.num_patches + float_model.num_prefix_tokens
    block = float_model.blocks[0]
    dim, hidden, classes = block.attn.qkv.in_features, block.mlp.fc1.out_features, float_model.head.out_features
    assert sizes["blocks.0.attn.qkv.weight_quantizer"] == tokens * dim * 3 * dim * 6
    assert sizes["blocks.0.mlp.fc2.weight_quantizer"] == tokens * hidden * dim * 6
    assert sizes["blocks.1.mlp.fc2.weight_quantizer"] == tokens * hidden * dim * 32  # float input: 32 bits
    assert sizes["head.weight_quantizer"] == dim * classes * 6  # the class token only
    conv = float_model.patch_embed.proj
    assert sizes["patch_embed.proj.weight_quantizer"] == float_model.patch_embed.num_patches * dim * \
        conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * 8  # the image input stays at 8 bits
    budget = Budget.parse("bops=0.05")
    assert budget.weights and budget.total_bits(sizes) == 5e7
    assert budget.describe({p: 4 for p in sizes}, sizes) == f"{4 * sum(sizes.values()) / 1e9:.3f} GBOPs (budget 0.05)"


def test_overrides_file_round_trips_and_names_a_bad_line(tmp_path):
    path = tmp_path / "o.txt"
    path.write_text("# allocation\n" + overrides_text({"blocks.0.mlp.fc1.weight_quantizer": 3, "head": 8}) + "\n")
    assert read_overrides_file(path) == ["blocks.0.mlp.fc1.weight_quantizer=3", "head=8"]
    path.write_text("head=8\nhead\n")
    with pytest.raises(VitqError, match=r"o.txt:2: override 'head'"):
        read_overrides_file(path)
    with pytest.raises(VitqError, match="cannot read overrides file"):
        read_overrides_file(tmp_path / "missing.txt")


def test_bit_sensitivities_cost_every_weight_at_every_bit_width(float_model):
    images = random_images(4)
    labels = torch.tensor([1, 2, 3, 4])
    config = vitq.QuantConfig(method="minmax", w_bits=4, a_bits=8, calib_size=2)
    costs, sizes = bit_sensitivities(float_model, config, images[:2], images, labels, (3, 8), weights=True,
                                     progress=False)
    weights = [s.name for s in vitq.prepare(float_model, config).slots() if s.role == "weight"]
    assert list(costs) == weights and all(set(c) == {3, 8} for c in costs.values())
    assert sizes["head.weight_quantizer"] == float_model.head.weight.numel()
    assert sum(c[3] for c in costs.values()) > sum(c[8] for c in costs.values())
    bits = allocate(costs, sizes, Budget.parse("w-avg-bits=5").total_bits(sizes))
    overrides = [PointOverride.parse(line) for line in overrides_text(bits).splitlines()]
    qmodel = vitq.prepare(float_model, config.model_copy(update={"overrides": overrides}))
    built = {s.name: s.quantizer.bits for s in qmodel.slots() if s.role == "weight"}
    assert built == bits
    assert sum(built[p] * sizes[p] for p in built) <= 5 * sum(sizes.values())


def test_weight_rewriting_methods_measure_weights_on_their_round_to_nearest_twin(float_model):
    config = vitq.QuantConfig(method="gptq", w_bits=4, a_bits=8, options={"damp": 0.02}, seed=3)
    twin = weight_sensitivity_config(config)
    assert twin.method == "repq-vit" and twin.options == {} and (twin.w_bits, twin.a_bits, twin.seed) == (4, 8, 3)
    plain = vitq.QuantConfig(method="percentile")
    assert weight_sensitivity_config(plain) is plain
    assert weight_sensitivity_config(plain.model_copy(update={"reconstruct": ReconConfig()})).reconstruct is None
    # why: GPTQ leaves its rounded weights in the model, so with every quantizer off it is not the float model
    images = random_images(4)
    qmodel = vitq.quantize(float_model, config.model_copy(update={"calib_size": 4}), images, progress=False)
    with torch.no_grad(), qmodel.quantization_disabled():
        assert (qmodel(images) - float_model(images)).abs().max() > 1e-3
