"""EfficientViT (MIT) specifics beyond the shared family checks (tests/test_families.py): BatchNorm folding in both
series (B: Hardswish, MBConv; L: GELU, fused MBConv), what the points of the ReLU linear attention see and that
they are on the path (the family has no softmax, so the shared softmax check is skipped and these take its
place), float32 attention under autocast, W8A8 closeness, save → load of an L model, roles and tensor names."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_batchnorm_statistics, random_timm_model, rel_diff, seeded_randn
from torch import nn

import vitq
from vitq import PointOverride, QuantConfig
from vitq.models import adapter_for
from vitq.models.smoke import SmokeConfig, build_smoke_model, smoke_images
from vitq.models.timm_efficientvit_mit import EfficientVitMitAdapter
from vitq.nn import QConv2d, QLayerNorm, QLinear
from vitq.nn.attention import QuantLiteMLA

B, L = "efficientvit_b0", "efficientvit_l1"
#: stem, two conv stages, a stage with one EfficientViT block (B: the third stage; L: the fourth)
SMALL = {B: {"widths": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "head_dim": 16, "head_widths": (64, 80)},
         L: {"widths": (8, 16, 32, 64, 64), "depths": (1, 1, 1, 1, 1), "head_dim": 16, "head_widths": (64, 80)}}
ATTN = {B: "stages.2.blocks.1.context_module.main", L: "stages.3.blocks.1.context_module.main"}
POINTS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "kv": "attn_v"}
#: ``percentile`` W8A8 logit SQNR floor of the small configs with measured BatchNorm statistics: both measure
#: 20.1-20.5 dB with seed 0 (19-22 dB for B and 16-21 dB for L over seeds 0-4)
SQNR_FLOOR_DB = 17.0


def build(name: str) -> nn.Module:
    """A small random model (seed 0), parameters nudged and random BatchNorm statistics, so that the folds are not
    near-identities."""
    return random_timm_model(name, batchnorm=random_batchnorm_statistics(0.2), **SMALL[name])


def build_measured(name: str) -> nn.Module:
    """The small model with BatchNorm statistics measured on random images, as :mod:`vitq.models.smoke` builds them:
    its logits depend on the image, so quantization errors show."""
    return build_smoke_model(SmokeConfig(name, name, {**SMALL[name], "pretrained_cfg_overlay": {
        "input_size": (3, 64, 64)}}, None, batchnorm_statistics=True))


def images(n: int = 2) -> torch.Tensor:
    return seeded_randn(n, 3, 64, 64, seed=1)


def _float(model: nn.Module) -> vitq.QuantizedModel:
    return vitq.prepare(model, QuantConfig(method="float"))


def _sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.square().mean() / (out - ref).square().mean()))


@torch.no_grad()
@pytest.mark.parametrize("name", [B, L])
def test_batchnorm_folding_keeps_the_float_function_and_stages_compose(name):
    model = build(name)
    x = images()
    qmodel = _float(model)
    out = qmodel(x)
    assert rel_diff(out, model(x)) <= 1e-5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qmodel.model.modules())
    assert isinstance(qmodel.model.stem.in_conv.norm, nn.Identity)
    staged = x
    for stage in qmodel.stages():
        staged = stage.run(staged)
    assert torch.equal(staged, out)
    assert [s.name for s in qmodel.stages()][:2] == ["stem", "stages.0.blocks.0"]


def test_adapter_matches_both_series():
    assert adapter_for(build(B)) is EfficientVitMitAdapter and adapter_for(build(L)) is EfficientVitMitAdapter


def _lite_mla(name: str) -> nn.Module:
    return build(name).get_submodule(ATTN[name])


@torch.no_grad()
@pytest.mark.parametrize("name", [B, L])
def test_lite_mla_computes_timms_output_and_its_points_see_the_products(name):
    """Quantizers off, the module computes timm's ``LiteMLA`` bit for bit; q and k are the ReLU outputs, v the raw
    values and kv the product relu(k)ᵀ·v, all per head ([B, heads, ·, ·]: one head per qkv group and scale)."""
    attn = _lite_mla(name)
    wrapped = QuantLiteMLA(copy.deepcopy(attn))
    x = seeded_randn(2, 64, 4, 4, seed=3)
    seen = {}
    for point in POINTS:
        getattr(wrapped, point).register_forward_hook(lambda m, a, out, key=point: seen.__setitem__(key, out))
    assert torch.equal(wrapped(x), attn(x))
    heads = 2 * 64 // attn.dim  # the qkv heads and the aggregated ones
    for point in ("q", "k", "v"):
        assert seen[point].shape == (2, heads, 16, attn.dim)
    assert seen["kv"].shape == (2, heads, attn.dim, attn.dim)
    assert (seen["q"] >= 0).all() and (seen["k"] >= 0).all() and (seen["v"] < 0).any()
    assert torch.allclose(seen["kv"], seen["k"].transpose(-1, -2) @ seen["v"], atol=1e-5)
    normalised = (seen["q"] @ seen["kv"]) / (seen["q"] @ seen["k"].sum(-2).unsqueeze(-1) + attn.eps)
    proj_in = {}
    wrapped.proj.conv.register_forward_pre_hook(lambda m, a: proj_in.__setitem__("x", a[0]))
    wrapped(x)
    assert torch.allclose(proj_in["x"], normalised.transpose(-1, -2).reshape(2, -1, 4, 4), atol=1e-5)


@torch.no_grad()
def test_lite_mla_products_run_in_float32_under_autocast():
    """As timm's: under bfloat16 autocast the convolutions run in bfloat16, the attention products in float32."""
    attn = _lite_mla(B)
    wrapped = QuantLiteMLA(copy.deepcopy(attn))
    x = seeded_randn(2, 64, 4, 4, seed=3)
    seen = {}
    wrapped.v.register_forward_pre_hook(lambda m, a: seen.__setitem__("v", a[0].dtype))
    wrapped.kv.register_forward_pre_hook(lambda m, a: seen.__setitem__("kv", a[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = wrapped(x), attn(x)
    assert seen == {"v": torch.bfloat16, "kv": torch.float32}
    assert out.dtype == ref.dtype and torch.equal(out, ref)


@pytest.fixture(scope="module")
def measured():
    """``{series: (float model with measured BatchNorm statistics, images)}``."""
    return {name: (model, smoke_images(model)) for name in (B, L) for model in [build_measured(name)]}


@torch.no_grad()
@pytest.mark.parametrize("name", [B, L])
@pytest.mark.parametrize("point", list(POINTS))
def test_attention_points_are_on_the_path(measured, name, point):
    """The family has no softmax point: each attention point instead, alone enabled at 2 bits, changes the
    logits, and sees what it should (non-negative for the ReLU outputs q and k)."""
    model, x = measured[name]
    path = f"{ATTN[name]}.{point}"
    qmodel = vitq.prepare(model, QuantConfig(method="minmax", overrides=[PointOverride(pattern=path, bits=2)]))
    module = qmodel.model.get_submodule(path)
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with qmodel.quantization_disabled():
            float_out = qmodel(x)
            module.quantizer.enabled = True
            module.quantizer.calibrating = True  # calibrates on this forward, then quantizes
            quant_out = qmodel(x)
    finally:
        handle.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # upstream of the point nothing changed
    if point in ("q", "k"):
        assert (seen[0] >= 0).all()
    assert rel_diff(quant_out, float_out) > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("name", [B, L])
def test_percentile_w8a8_is_close_to_float(measured, name):
    model, x = measured[name]
    qmodel = vitq.quantize(model, QuantConfig(method="percentile", w_bits=8, a_bits=8, calib_size=2), x,
                           model_name=name, progress=False)
    assert _sqnr_db(qmodel(x), model(x)) >= SQNR_FLOOR_DB


@torch.no_grad()
def test_l_series_save_load_is_bit_identical(measured, tmp_path, monkeypatch):
    """The L series (GELU, fused MBConv, post_gelu classifier input); the file names the full timm model, the
    loader is pointed at the small config (its shapes are traced on the meta device, where autocast is off)."""
    import vitq.export.checkpoint as checkpoint

    model, x = measured[L]
    small = copy.deepcopy(model)
    qmodel = vitq.quantize(model, QuantConfig(method="percentile", w_bits=8, a_bits=8, calib_size=2), x,
                           model_name=L, progress=False)
    monkeypatch.setattr(checkpoint, "create_architecture",
                        lambda model_name, device=None: copy.deepcopy(small).to(device or "cpu"))
    path = vitq.save(qmodel, tmp_path / "q.safetensors")
    assert torch.equal(vitq.load(path)(x), qmodel(x))


@pytest.mark.parametrize("name", [B, L])
def test_points_and_roles(name):
    qmodel = _float(build(name))
    model = qmodel.model
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.LayerNorm) for m in model.modules())
    roles = {slot.point: slot.role for slot in qmodel.slots() if slot.attr != "weight_quantizer"}
    assert roles.pop("stem.in_conv.conv") == "image"
    assert roles.pop("head.classifier.4") == ("post_gelu" if name == L else "act")  # Hardswish dips below GELU
    assert roles.pop("head.classifier.1") == "pre_ln"
    attn = ATTN[name]
    for point, role in POINTS.items():
        assert roles.pop(f"{attn}.{point}") == role
    assert set(roles.values()) == {"act"}  # every other conv and Linear
    mla = model.get_submodule(attn)
    assert isinstance(mla, QuantLiteMLA) and isinstance(model.head.classifier[1], QLayerNorm)
    assert isinstance(model.head.classifier[4], QLinear)
    depthwise, grouped = mla.aggreg[0]
    assert isinstance(depthwise, QConv2d) and depthwise.groups == depthwise.weight.shape[0] == 3 * 64
    assert isinstance(grouped, QConv2d) and grouped.groups == 3 * 64 // mla.dim  # one group per head
    assert qmodel.norm_linear_pairs() == []
    assert qmodel.attention_modules() == []  # no softmax attention: the softmax-map searches have nothing to do


def test_state_dict_names():
    """timm's names, except that the BatchNorms (``*.norm``) are folded into their convolutions' biases."""
    timm_keys = set(build(B).state_dict())
    keys = set(_float(build(B)).model.state_dict())
    folded = {k.replace(".norm.running_mean", ".conv.bias") for k in timm_keys if k.endswith(".norm.running_mean")}
    new = keys - timm_keys  # the conv biases that the folds create (where the conv had none)
    assert new and new == folded - timm_keys
    assert {k for k in timm_keys - keys if ".norm." not in k} == set()
    assert "head.classifier.1.weight" in keys  # the LayerNorm is not folded
