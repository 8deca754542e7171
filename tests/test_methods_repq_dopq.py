"""The ``repq-vit`` and ``dopq-vit`` methods end to end on tiny random-init models (docs/methods/repq-vit.md,
docs/methods/dopq-vit.md, docs/protocol.md#softmax-quantizers-alone, docs/protocol.md#target-cancellation)."""

from __future__ import annotations

import pytest
import torch
from helpers import quantized_test_vit, randomize_norms
from torch import nn

import vitq
from vitq.config import QuantConfig
from vitq.errors import VitqError
from vitq.methods import method_class
from vitq.methods.dopq_vit import sosf_search
from vitq.methods.repq_vit.reparam import reparameterize_model
from vitq.nn import QLinear
from vitq.quantizers import UniformQuantizer, build_quantizer

timm = pytest.importorskip("timm")

VIT = "test_vit"
SWIN = "swin_tiny_patch4_window7_224"
SWIN_KWARGS = {"embed_dim": 24, "depths": (2, 2), "num_heads": (3, 6), "img_size": 112}

#: (method, options) of the end-to-end runs: every ``target`` and every ``softmax`` option at least once
RUNS = [
    pytest.param("repq-vit", {}, id="repq"),
    pytest.param("dopq-vit", {}, id="dopq-default"),
    pytest.param("dopq-vit", {"target": "mean", "softmax": "log_sqrt2"}, id="dopq-mean-logsqrt2"),
    pytest.param("dopq-vit", {"target": "search", "softmax": "log2"}, id="dopq-search-log2"),
    pytest.param("dopq-vit", {"target": "none", "softmax": "uniform"}, id="dopq-none-uniform"),
    pytest.param("dopq-vit", {"tan_variant": "tan", "ratio_bound": 2.0}, id="dopq-tan-rho2"),
]
EXPECTED_SOFTMAX = {"repq-vit": "log_sqrt2", "dopq-vit": "tanq"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    vit = randomize_norms(timm.create_model(VIT, pretrained=False).eval())
    swin = randomize_norms(timm.create_model(SWIN, pretrained=False, **SWIN_KWARGS).eval())
    return {"vit": vit, "swin": swin}


def _name(arch: str) -> str:
    return VIT if arch == "vit" else SWIN


def _images(model: nn.Module, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def quantized(models):
    """``quantized(arch, method, options)``: one calibrated W4A4 model per setting, shared by the tests."""
    cache: dict[tuple, vitq.QuantizedModel] = {}

    def get(arch: str, method: str, options: dict) -> vitq.QuantizedModel:
        key = (arch, method, tuple(sorted(options.items())))
        if key not in cache:
            config = QuantConfig(method=method, w_bits=4, a_bits=4, calib_size=2, options=options)
            model = models[arch]
            cache[key] = vitq.quantize(model, config, _images(model), model_name=_name(arch), progress=False)
        return cache[key]

    return get


def _post_ln_linears(qmodel) -> dict[str, QLinear]:
    return {lin: qmodel.model.get_submodule(lin) for _, lin in qmodel.norm_linear_pairs()}


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(("method", "options"), RUNS)
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_quantize_structure_and_float_function(models, quantized, arch, method, options):
    model = models[arch]
    qmodel = quantized(arch, method, options)
    quantizers = qmodel.quantizers()
    assert quantizers and all(q.is_calibrated for q in quantizers.values())

    # the softmax slots hold the method's post-Softmax quantizer
    specs = qmodel.quant_specs()
    softmax = {name: spec for name, spec in specs.items() if name.endswith("attn.softmax.quantizer")}
    assert len(softmax) == len(qmodel.attention_modules()) > 0
    kind = options.get("softmax", EXPECTED_SOFTMAX[method])
    assert {spec["kind"] for spec in softmax.values()} == {kind}
    if kind == "tanq":
        assert {spec["variant"] for spec in softmax.values()} == {options.get("tan_variant", "tan_log")}

    # post-LayerNorm inputs: per tensor after the fold, per channel only when nothing is folded
    linears = _post_ln_linears(qmodel)
    assert len(linears) == (12 if arch == "vit" else 9)
    if arch == "swin":
        assert "layers.1.downsample.reduction" in linears
    for name, linear in linears.items():
        quantizer = linear.input_quantizer
        assert isinstance(quantizer, UniformQuantizer), name
        if options.get("target") == "none":
            assert quantizer.granularity == "channel" and quantizer.scale.numel() == linear.weight.shape[1]
        else:
            assert quantizer.granularity == "tensor" and quantizer.scale.numel() == 1
    reduction_bias = dict(qmodel.model.named_parameters()).get("layers.1.downsample.reduction.bias")
    if arch == "swin":  # the fold creates a bias where timm has none; target none folds nothing
        assert (reduction_bias is None) == (options.get("target") == "none")

    images = _images(model)
    with torch.no_grad():
        reference = model(images)
        with qmodel.quantization_disabled():
            unquantized = qmodel(images)
        logits = qmodel(images)
    torch.testing.assert_close(unquantized, reference, rtol=0, atol=1e-4)  # the fold keeps the float function
    assert torch.isfinite(logits).all() and not torch.equal(logits, reference)


@pytest.mark.parametrize("method", ["repq-vit", "dopq-vit"])
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_save_load_round_trip_is_bit_identical(models, quantized, arch, method, tmp_path, monkeypatch):
    if arch == "swin":  # vitq.load rebuilds the architecture by name: give it the tiny Swin's config
        create = timm.create_model
        monkeypatch.setattr(timm, "create_model",
                            lambda name, **kw: create(name, **({**SWIN_KWARGS, **kw} if name == SWIN else kw)))
    qmodel = quantized(arch, method, {})
    path = vitq.save(qmodel, tmp_path / "q.safetensors")
    loaded = vitq.load(path)
    assert loaded.quant_specs() == qmodel.quant_specs()
    if arch == "swin":
        bias = loaded.model.layers[1].downsample.reduction.bias
        assert bias is not None and torch.equal(bias, qmodel.model.layers[1].downsample.reduction.bias)
    for name, q in qmodel.quantizers().items():
        other = loaded.quantizers()[name]
        for param in q.param_names:
            assert torch.equal(getattr(other, param), getattr(q, param)), (name, param)
    images = _images(models[arch], seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(images), qmodel(images))


# ------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("options", [
    pytest.param({"softmax": "log3"}, id="softmax"),
    pytest.param({"target": "max"}, id="target"),
    pytest.param({"ratio_bound": 1}, id="bound-1"),
    pytest.param({"ratio_bound": 0.5}, id="bound-0.5"),
    pytest.param({"ratio_bound": "4"}, id="bound-str"),
    pytest.param({"ratio_bound": True}, id="bound-bool"),
    pytest.param({"clip": 0.99}, id="unknown-key"),
])
def test_dopq_option_validation(models, options):
    config = QuantConfig(method="dopq-vit", options=options)
    with pytest.raises(VitqError):
        method_class("dopq-vit")(config)
    with pytest.raises(VitqError):
        vitq.quantize(models["vit"], config, _images(models["vit"]), model_name=VIT, progress=False)


def test_dopq_valid_options_and_defaults():
    method = method_class("dopq-vit")(QuantConfig(method="dopq-vit", options={"ratio_bound": 2.0, "target": "search"}))
    assert method.options.model_dump() == {"softmax": "tanq", "tan_variant": "tan_log", "target": "search",
                                           "ratio_bound": 2.0, "smooth": False}
    assert method.quantizer_spec("softmax") == {"kind": "tanq", "bits": 8, "variant": "tan_log"}
    with pytest.raises(VitqError):
        method_class("repq-vit")(QuantConfig(method="repq-vit", options={"target": "median"}))


# ------------------------------------------------------------------------------------------- TanQ by attention output
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_attention_output_calibration_beats_plain_calibration(models, arch):
    """dopq-vit's softmax quantizer (chosen by ‖A·Q(v) − Q(A)·Q(v)‖²) is never worse on that error than
    the candidate plain ``calibrate`` picks (by ‖A − Q(A)‖²), on the very A and Q(v) it was chosen on."""
    model = models[arch]
    qmodel = vitq.prepare(model, QuantConfig(method="dopq-vit", w_bits=4, a_bits=4), model_name=_name(arch))
    captured: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for i, module in enumerate(qmodel.attention_modules()):
        seen = captured.setdefault(str(i), {})

        def keep_attn(_m, args, seen=seen):  # the first call is the calibration pass
            seen.setdefault("attn", args[0].detach().clone())

        def keep_v(_m, _args, output, seen=seen):
            seen.setdefault("v", output.detach().clone())

        hooks += [module.softmax.register_forward_pre_hook(keep_attn), module.v.register_forward_hook(keep_v)]
    try:
        method_class("dopq-vit")(qmodel.config).calibrate(qmodel, _images(model), progress=False)
    finally:
        for hook in hooks:
            hook.remove()

    def error(quantizer, attn, v) -> float:
        return float((attn @ v - quantizer.quantize_dequantize(attn) @ v).double().square().sum())

    better = 0
    for i, module in enumerate(qmodel.attention_modules()):
        attn, v = captured[str(i)]["attn"], captured[str(i)]["v"]
        chosen = module.softmax.quantizer
        plain = build_quantizer(chosen.spec())
        plain.calibrate(attn)
        assert plain.get_params().keys() == chosen.get_params().keys()
        chosen_err, plain_err = error(chosen, attn, v), error(plain, attn, v)
        assert chosen_err <= plain_err * (1 + 1e-6) + 1e-12, (i, chosen_err, plain_err)
        better += chosen_err < plain_err * (1 - 1e-6)
    assert better > 0  # the downstream criterion really picks other parameters somewhere


# ------------------------------------------------------------------------------------------- SOSF
def test_sosf_is_never_worse_than_mosf(models):
    model = models["vit"]
    qmodel = vitq.prepare(model, QuantConfig(method="minmax", w_bits=4, a_bits=4), model_name=VIT)
    records = []

    def search(ctx):
        choice = sosf_search(ctx)
        assert len(choice) == 3
        chosen = ctx.output_error(tuple(choice[:2]), ratio_bound=choice[2])
        mosf = ctx.output_error("median", ratio_bound=None)
        records.append((ctx.linear_name, chosen, mosf, choice[2]))
        return choice

    folds = reparameterize_model(qmodel, _images(model), progress=False, target_search=search)
    assert [name for name, *_ in records] == [f.linear for f in folds] and len(folds) == 12
    for name, chosen, mosf, _ in records:
        assert chosen <= mosf, (name, chosen, mosf)
    assert [bound for *_, bound in records] == [f.ratio_bound for f in folds]


def test_adalog_structure_and_round_trip(tmp_path):
    """AdaLog: adaptive-log softmax (scale 1) and shifted post-GELU quantizers, per-head q/k/v, integer
    reparameterized zero points; saves and reloads bit for bit."""
    model, images, qmodel = quantized_test_vit("adalog", 4, 4)
    quantizers = qmodel.quantizers()
    softmax = quantizers["blocks.0.attn.softmax.quantizer"]
    assert softmax.kind == "adalog" and float(softmax.scale) == 1.0 and 10 <= float(softmax.base) <= 138
    gelu = quantizers["blocks.0.mlp.fc2.input_quantizer"]
    assert gelu.kind == "adalog" and gelu.shift > 0
    assert quantizers["blocks.0.attn.q.quantizer"].scale.numel() == model.blocks[0].attn.num_heads
    qkv_input = quantizers["blocks.0.attn.qkv.input_quantizer"]
    assert qkv_input.scale.numel() == 1 and float(qkv_input.zero_point) == round(float(qkv_input.zero_point))
    path = vitq.save(qmodel, tmp_path / "adalog.safetensors")
    with torch.no_grad():
        assert torch.equal(vitq.load(path)(images), qmodel(images))


def _layer_input(qmodel, name: str, images: torch.Tensor) -> torch.Tensor:
    """The input that reaches the Linear ``name`` of ``qmodel`` on ``images`` (before its input quantizer)."""
    seen = []
    hook = qmodel.model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        qmodel(images)
    hook.remove()
    return seen[0]


def test_adalog_fpcs_lowers_the_layer_output_error():
    """FPCS searches every Linear's uniform (scale, zero point) by the layer's output error: on the calibration
    images, each block-0 Linear of the searched model has a lower ‖x·Wᵀ − Q(x)·Q(W)ᵀ‖² than the same layer with
    the ``fpcs=false`` quantizers (same weights: FPCS changes quantizers only), on the very same input x."""
    _, images, searched = quantized_test_vit("adalog", 4, 4)
    _, _, plain = quantized_test_vit("adalog", 4, 4, fpcs=False)
    calib = images[:2]
    for name in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"):
        layer_s, layer_p = searched.model.get_submodule(name), plain.model.get_submodule(name)
        assert torch.equal(layer_s.weight, layer_p.weight), name
        x = _layer_input(searched, name, calib)
        with torch.no_grad():
            exact = torch.nn.functional.linear(x, layer_s.weight, layer_s.bias)
            error_s, error_p = ((layer(x) - exact).pow(2).sum() for layer in (layer_s, layer_p))
        assert error_s < error_p, (name, error_s, error_p)
    assert torch.equal(searched.quantizers()["blocks.0.attn.softmax.quantizer"].base,
                       plain.quantizers()["blocks.0.attn.softmax.quantizer"].base)  # the AdaLog search is FPCS-free


@pytest.mark.parametrize("options, message", [
    ({"fpcs": "yes"}, "option fpcs: Input should be a valid boolean .*valid options: fpcs, fpcs_rounds"),
    ({"fpcs_rounds": 0}, "option fpcs_rounds: Input should be greater than or equal to 1"),
    ({"fpcs_round": 1}, "has no option.* fpcs_round; valid options: fpcs, fpcs_rounds"),
])
def test_adalog_bad_options_are_named(options, message):
    with pytest.raises(VitqError, match=message):
        method_class("adalog")(QuantConfig(method="adalog", options=options))
