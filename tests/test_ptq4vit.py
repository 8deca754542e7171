"""Tests of PTQ4ViT: the Hessian-guided metric and search (against straightforward loops), the task-loss
gradients, the ``ptq4vit`` method's structure, options, calibration and export refusals."""

import pytest
import torch
import torch.nn.functional as F
from helpers import quantized_test_vit

import vitq
from vitq.errors import VitqError
from vitq.export.integer_vit import IntegerViT
from vitq.export.onnx import export_onnx
from vitq.methods.ptq4vit.hessian import SearchProblem, alternating_search, hessian_metric, ptq4vit_candidates
from vitq.methods.ptq4vit.products import softmax_input_grad, stage_products, straight_through, task_gradients
from vitq.nn import QAct
from vitq.quantized_model import Slot
from vitq.quantizers import build_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _symmetric(bits: int, **granularity) -> dict:
    return {"kind": "uniform", "bits": bits, "signed": True, "symmetric": True, "init": "minmax", **granularity}


def _linear_problem(seed: int = 0, rows: int = 64, cols: int = 12, outs: int = 6):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator) * torch.linspace(0.2, 3, cols)
    w = torch.randn(outs, cols, generator=generator) * torch.linspace(0.1, 2, outs)[:, None]
    grad = torch.randn(rows, outs, generator=generator)
    return x, w, grad


# ---------------------------------------------------------------- the metric and the search


def test_hessian_metric_is_minus_the_mean_of_the_weighted_squared_error():
    generator = torch.Generator().manual_seed(0)
    out, ref, grad = (torch.randn(3, 4, 5, generator=generator) for _ in range(3))
    total, count = 0.0, 0
    for i in range(3):
        for j in range(4):
            for k in range(5):
                total += (grad[i, j, k].item() * (ref[i, j, k].item() - out[i, j, k].item())) ** 2
                count += 1
    assert hessian_metric(out, ref, grad) == pytest.approx(-total / count, rel=1e-6)


def test_weight_search_picks_the_best_candidate_of_an_exhaustive_loop():
    x, w, grad = _linear_problem()
    weights = build_quantizer(_symmetric(3))
    alternating_search(SearchProblem(F.linear, x, w, grad, None, weights), eq_n=40)
    chosen = weights.get_params()
    scores = []
    for params in ptq4vit_candidates(weights, w, 40):  # an independent loop over the same candidates
        weights.set_params(params)
        scores.append(hessian_metric(F.linear(x, weights(w)), F.linear(x, w), grad))
    best = max(range(len(scores)), key=scores.__getitem__)
    torch.testing.assert_close(chosen["scale"], ptq4vit_candidates(weights, w, 40)[best]["scale"], rtol=0, atol=0)


def test_per_channel_weights_are_chosen_channel_by_channel():
    x, w, grad = _linear_problem(1)
    weights = build_quantizer(_symmetric(3, granularity="channel", axis=0))
    alternating_search(SearchProblem(F.linear, x, w, grad, None, weights, b_channel_dim=-1), eq_n=30)
    chosen = weights.scale.clone()
    candidates = ptq4vit_candidates(weights, w, 30)
    for row in range(w.shape[0]):  # output row `row` only depends on its own step
        errors = []
        for params in candidates:
            step = params["scale"][row]
            q = torch.clamp(torch.round(w[row] / step), -4, 3) * step
            errors.append(((x @ q - x @ w[row]) * grad[:, row]).square().sum().item())
        assert chosen[row] == candidates[min(range(len(errors)), key=errors.__getitem__)]["scale"][row]


def test_alternating_search_ends_coordinate_wise_optimal():
    x, w, grad = _linear_problem(2)
    inputs, weights = build_quantizer(_symmetric(4)), build_quantizer(_symmetric(4))
    alternating_search(SearchProblem(F.linear, x, w, grad, inputs, weights), eq_n=25, rounds=2)
    final = hessian_metric(F.linear(inputs(x), weights(w)), F.linear(x, w), grad)
    chosen = inputs.get_params()
    for params in ptq4vit_candidates(inputs, x, 25):  # the last step searched the input: none is better
        inputs.set_params(params)
        assert hessian_metric(F.linear(inputs(x), weights(w)), F.linear(x, w), grad) <= final + 1e-12
    inputs.set_params(chosen)


def test_twin_softmax_split_is_searched_by_the_weighted_attention_error():
    generator = torch.Generator().manual_seed(3)
    attn = (torch.randn(2, 2, 8, 8, generator=generator) * 3).softmax(-1)
    v = torch.randn(2, 2, 8, 4, generator=generator)
    grad = torch.randn(2, 2, 8, 4, generator=generator)
    softmax = build_quantizer({"kind": "twin_uniform_softmax", "bits": 3})
    alternating_search(SearchProblem(torch.matmul, attn, v, grad, softmax, None, first="a"), eq_n=10)
    chosen = float(softmax.get_params()["split"])
    scores = []
    for params in softmax.search_candidates(attn):
        softmax.set_params(params)
        scores.append(hessian_metric(softmax(attn) @ v, attn @ v, grad))
    assert chosen == 2.0 ** -max(range(20), key=scores.__getitem__)


def test_eq_n_is_validated():
    x, w, grad = _linear_problem()
    with pytest.raises(VitqError, match="eq_n must be an integer >= 2"):
        alternating_search(SearchProblem(F.linear, x, w, grad, None, build_quantizer(_symmetric(4))), eq_n=1)


# ---------------------------------------------------------------- gradients


def test_softmax_input_grad_is_the_softmax_backward():
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 3, 5, 5, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 3, 5, 5, generator=generator)
    probs = scores.softmax(-1)
    (probs * upstream).sum().backward()
    torch.testing.assert_close(softmax_input_grad(probs.detach(), upstream), scores.grad)


def test_straight_through_passes_gradients_and_is_restored():
    quantizer = build_quantizer(_symmetric(3))
    x = torch.randn(20, requires_grad=True)
    quantizer.calibrate(x.detach())
    point = QAct("act")
    point.quantizer = quantizer
    with straight_through([Slot("p", "quantizer", "act", point)]):
        y = point(x)
        y.sum().backward()
        torch.testing.assert_close(y.detach(), quantizer(x.detach()))
    assert torch.equal(x.grad, torch.ones(20))
    assert point.quantizer is quantizer


def test_task_gradients_are_the_kl_gradient_and_never_all_zero():
    _, images, qmodel = quantized_test_vit("ptq4vit", 4, 4, eq_n=8)
    with torch.no_grad(), qmodel.quantization_disabled():
        target = qmodel(images).softmax(-1)
    stages = qmodel.stages()
    # the head's output is the logits z: ∂KL/∂z = softmax(z) − target per image
    head = stage_products(qmodel, stages[-1], 1)
    x = images
    with torch.no_grad():
        for stage in stages[:-1]:
            x = stage.run(x)
        expected = qmodel(images).softmax(-1) - target
    grads = task_gradients(qmodel, len(stages) - 1, x, target, head, batch_size=3)
    torch.testing.assert_close(grads["head"], expected, atol=1e-6, rtol=1e-4)
    # the embedding stage has nothing quantized upstream: its own quantization makes the gradient non-zero
    embed = stage_products(qmodel, stages[0], 2)
    grads = task_gradients(qmodel, 0, images, target, embed)
    assert [p.name for p in embed] == ["patch_embed.proj"]
    assert grads["patch_embed.proj"].abs().sum() > 0
    block = stage_products(qmodel, stages[1], 2)
    assert [p.name for p in block] == ["blocks.0.attn.qkv", "blocks.0.attn.scores", "blocks.0.attn.context",
                                       "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    with torch.no_grad():
        x = stages[0].run(images)
    grads = task_gradients(qmodel, 1, x, target, block)
    assert all(grads[p.name].abs().sum() > 0 for p in block)
    # 101 tokens: every 2nd query row (51) of the [images, heads, queries, keys] scores, every 2nd token row of fc1
    assert grads["blocks.0.attn.scores"].shape == (4, 2, 51, 101)
    assert grads["blocks.0.mlp.fc1"].shape[0] == 4 * 51


# ---------------------------------------------------------------- the method


def test_structure_is_ptq4vit_granularity():
    _, _, qmodel = quantized_test_vit("ptq4vit", 4, 4, eq_n=8)
    specs = qmodel.quant_specs()
    assert specs["patch_embed.proj.input_quantizer"] is None
    assert specs["patch_embed.proj.weight_quantizer"]["granularity"] == "channel"
    assert specs["blocks.0.attn.qkv.weight_quantizer"]["granularity"] == "head"
    assert specs["blocks.0.attn.qkv.weight_quantizer"]["groups"] == 3
    assert qmodel.quantizers()["blocks.0.attn.qkv.weight_quantizer"].scale.numel() == 3
    for name in ("blocks.0.attn.proj.weight_quantizer", "blocks.0.mlp.fc1.weight_quantizer", "head.weight_quantizer",
                 "blocks.0.attn.q.quantizer", "blocks.0.mlp.fc1.input_quantizer", "head.input_quantizer"):
        assert specs[name]["granularity"] == "tensor" and specs[name]["symmetric"] and specs[name]["signed"]
    assert specs["blocks.0.attn.softmax.quantizer"]["kind"] == "twin_uniform_softmax"
    assert specs["blocks.0.mlp.fc2.input_quantizer"]["kind"] == "twin_uniform_gelu"
    assert specs["blocks.0.norm1.input_quantizer"] is None
    _, _, channel = quantized_test_vit("ptq4vit", 4, 4, weight_granularity="channel", eq_n=8)
    assert all(spec["granularity"] == "channel" for name, spec in channel.quant_specs().items()
               if name.endswith("weight_quantizer"))


@pytest.mark.parametrize("options, message", [
    ({"weight_granularity": "row"}, "option weight_granularity: Input should be 'tensor' or 'channel' .*got 'row'"),
    ({"eq_n": 1}, "option eq_n: Input should be greater than or equal to 2 .*got 1"),
    ({"eq_n": True}, "option eq_n: Input should be a valid integer"),
    ({"gelu_grid": "log"}, "option gelu_grid: Input should be 'pow2' or 'linear' .*got 'log'"),
    ({"inputs": "both"}, "option inputs: Input should be 'quantized' or 'float' .*got 'both'"),
    ({"rounds": 2}, "has no option.* rounds; valid options: weight_granularity, eq_n, gelu_grid, inputs"),
])
def test_options_are_validated(options, message):
    with pytest.raises(VitqError, match=message):
        vitq.prepare(torch.nn.Linear(2, 2), vitq.QuantConfig(method="ptq4vit", options=options))


def test_w8a8_tracks_float_and_calibration_is_deterministic(tmp_path):
    model, images, qmodel = quantized_test_vit("ptq4vit", 8, 8, eq_n=20)
    _, _, again = quantized_test_vit("ptq4vit", 8, 8, eq_n=20)
    with torch.no_grad():
        reference, logits = model(images), qmodel(images)
        assert torch.equal(logits, again(images))
    assert ((logits - reference).square().mean() / reference.var()) < 0.01
    loaded = vitq.load(vitq.save(qmodel, tmp_path / "ptq4vit.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(images), logits)


@pytest.mark.parametrize("options", [{"inputs": "float", "gelu_grid": "linear", "eq_n": 8},
                                     {"weight_granularity": "channel", "eq_n": 8}])
def test_variants_calibrate(options):
    _, images, qmodel = quantized_test_vit("ptq4vit", 4, 4, **options)
    with torch.no_grad():
        assert torch.isfinite(qmodel(images)).all()
    assert all(q.is_calibrated for q in qmodel.quantizers().values())


# ---------------------------------------------------------------- export


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript ONNX exporter
def test_onnx_export_forms_of_the_twin_points(tmp_path):
    _, _, qmodel = quantized_test_vit("ptq4vit", 8, 8, eq_n=8)
    exported = export_onnx(qmodel, tmp_path / "ptq4vit.onnx")
    reasons = {p.slot: p.reason for p in exported.float_points}
    # the twin-uniform softmax has integer codes: codes + level lookup; the GELU output's has no such form here
    forms = {p.slot: p.form for p in exported.points}
    assert forms["blocks.0.attn.softmax.quantizer"] == "uint8 codes + level lookup"
    assert "twin_uniform_gelu quantizer (not uniform)" in reasons["blocks.0.mlp.fc2.input_quantizer"]
    assert "per-head" in reasons["blocks.0.attn.qkv.weight_quantizer"]


def test_integer_runtime_refuses_ptq4vit_and_names_the_point():
    _, images, qmodel = quantized_test_vit("ptq4vit", 8, 8, eq_n=8)
    with pytest.raises(VitqError, match="patch_embed.proj.input_quantizer .*float \\(not quantized\\)"):
        IntegerViT.compile(qmodel, images[:2])
    # its twin-uniform softmax alone has integer codes: the runtime takes it (by lookups)
    twin = vitq.QuantConfig(method="minmax", w_bits=8, a_bits=8, calib_size=2,
                            overrides=[vitq.PointOverride.parse("blocks.*.attn.softmax=twin_uniform_softmax")])
    model, images, _ = quantized_test_vit("minmax", 8, 8)
    qmodel = vitq.quantize(model, twin, images[:2], progress=False)
    assert IntegerViT.compile(qmodel, images[:2])(images[:2]).dtype == torch.int64


# ---------------------------------------------------------------- real model


@pytest.mark.integration
def test_w8a8_deit_tiny_within_one_point_of_float(deit_tiny, split_seed0, float_top1_seed0):
    calib, eval_data = split_seed0
    config = vitq.QuantConfig(method="ptq4vit", w_bits=8, a_bits=8, options={"eq_n": 20})
    qmodel = vitq.quantize(deit_tiny, config, calib, progress=False)
    assert abs(vitq.evaluate(qmodel, eval_data, progress=False).top1 - float_top1_seed0) <= 1.0
