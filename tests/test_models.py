"""Tests of the model adapters (timm ViT/DeiT and Swin) on small random-init models.

The wrapped float model must compute exactly what timm computes, expose the documented
quantization points with their roles, split into stages whose composition is the forward, and
route the attention map through the ``softmax`` point (never through a fused kernel).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import vitq
from vitq import PointOverride, QuantConfig
from vitq.models import adapter_for
from vitq.nn import QAct, QuantAttention, QuantWindowAttention

#: max abs logit difference accepted between the wrapped float model and timm
TOL = 1e-5

#: a small Swin that keeps what matters: patch4/window7 at 224, shifted windows (mask) and a PatchMerging
SWIN_KWARGS = {"embed_dim": 48, "depths": (2, 2), "num_heads": (3, 6)}


def _create(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = SWIN_KWARGS if name.startswith("swin") else {}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _with_fused_attn(model: nn.Module, fused: bool) -> nn.Module:
    """A copy of ``model`` whose attention modules use (or not) timm's fused SDPA path."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


MODEL_NAMES = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: _create(name) for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def swin_quantized(models, images) -> vitq.QuantizedModel:
    """Random-init Swin quantized with minmax W8A8 on the random images."""
    config = QuantConfig(method="minmax", w_bits=8, a_bits=8)
    return vitq.quantize(models["swin_tiny_patch4_window7_224"], config, images, progress=False)


# ---------------------------------------------------------------------------- adapter equivalence
@pytest.mark.parametrize("name", MODEL_NAMES)
@torch.no_grad()
def test_float_wrap_matches_timm(models, images, name):
    model = models[name]
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    assert qmodel.quantizers() == {}
    out = qmodel(images)
    # explicit (non-fused) timm attention: same operations in the same order
    unfused = _with_fused_attn(model, False)(images)
    assert _max_diff(out, unfused) <= TOL
    # timm's default path (fused SDPA for ViT/DeiT; Swin's fused path is opt-in, force it on)
    fused = _with_fused_attn(model, True)(images)
    assert _max_diff(out, fused) <= TOL
    # the wrapped model keeps timm's state_dict keys and loads a timm state dict strictly
    assert set(qmodel.model.state_dict()) == set(model.state_dict())
    qmodel.model.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("fused", [False, True])
@torch.no_grad()
def test_window_attention_matches_timm_with_mask(models, fused):
    """Module-level check at unit scale (random-init Swin logits are only ~0.1, so a dropped mask or bias
    moves them by ~1e-4 only): QuantWindowAttention vs timm WindowAttention on a shifted block."""
    block = models["swin_tiny_patch4_window7_224"].layers[0].blocks[1]
    attn = _with_fused_attn(block.attn, fused)  # a copy: the shared model is left alone
    attn.relative_position_bias_table.normal_(generator=torch.Generator().manual_seed(2))
    mask = block.attn_mask
    assert mask is not None and mask.shape == (64, 49, 49)
    x = torch.randn(2 * 64, 49, block.dim, generator=torch.Generator().manual_seed(3))
    ours = QuantWindowAttention(attn)
    out = ours(x, mask=mask)
    assert _max_diff(out, attn(x, mask=mask)) <= 1e-5
    assert _max_diff(ours(x), attn(x)) <= 1e-5
    assert _max_diff(out, ours(x)) > 1e-2  # the mask matters at this scale
    assert set(ours.state_dict()) == set(attn.state_dict())


def test_prepare_leaves_the_input_model_untouched(models):
    model = models["deit_tiny_patch16_224"]
    vitq.prepare(model, QuantConfig(method="float"))
    assert not any(isinstance(m, QAct) for m in model.modules())


def test_attention_modules_are_replaced(models):
    deit = vitq.prepare(models["deit_tiny_patch16_224"], QuantConfig(method="float")).model
    assert all(isinstance(block.attn, QuantAttention) for block in deit.blocks)
    swin = vitq.prepare(models["swin_tiny_patch4_window7_224"], QuantConfig(method="float")).model
    assert all(isinstance(block.attn, QuantWindowAttention) for layer in swin.layers for block in layer.blocks)
    # the test model exercises shifted windows (mask) in both stages and a PatchMerging
    assert swin.layers[0].blocks[1].attn_mask is not None
    assert swin.layers[1].blocks[1].attn_mask is not None
    assert not isinstance(swin.layers[1].downsample, nn.Identity)


def test_adapter_families(models):
    assert adapter_for(models["vit_tiny_patch16_224"]).family == "vit"
    assert adapter_for(models["deit_tiny_patch16_224"]).family == "vit"
    assert adapter_for(models["swin_tiny_patch4_window7_224"]).family == "swin"


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
@torch.no_grad()
def test_disabled_quantization_matches_timm(models, images, swin_quantized, name):
    """Calibrated minmax W8A8 (uncalibrated quantizers raise when enabled), run with quantization disabled."""
    model = models[name]
    if name.startswith("swin"):
        qmodel = swin_quantized
    else:
        qmodel = vitq.quantize(model, QuantConfig(method="minmax", w_bits=8, a_bits=8), images, progress=False)
    reference = _with_fused_attn(model, False)(images)
    with qmodel.quantization_disabled():
        assert _max_diff(qmodel(images), reference) <= TOL
    # enabled again afterwards: W8A8 changes the logits
    assert _max_diff(qmodel(images), reference) > 0


# ---------------------------------------------------------------------------- point names and roles
def _roles(qmodel: vitq.QuantizedModel) -> dict[str, dict[str, str]]:
    return {name: point.slots() for name, point in qmodel.points().items()}


def test_deit_points_and_roles(models):
    roles = _roles(vitq.prepare(models["deit_tiny_patch16_224"], QuantConfig(method="float")))
    linear = {"weight_quantizer": "weight"}
    expected = {
        "patch_embed.proj": {**linear, "input_quantizer": "image"},
        "blocks.3.attn.qkv": {**linear, "input_quantizer": "post_ln"},
        "blocks.3.attn.q": {"quantizer": "attn_q"},
        "blocks.3.attn.k": {"quantizer": "attn_k"},
        "blocks.3.attn.v": {"quantizer": "attn_v"},
        "blocks.3.attn.softmax": {"quantizer": "softmax"},
        "blocks.3.attn.proj": {**linear, "input_quantizer": "act"},
        "blocks.3.mlp.fc1": {**linear, "input_quantizer": "post_ln"},
        "blocks.3.mlp.fc2": {**linear, "input_quantizer": "post_gelu"},
        "head": {**linear, "input_quantizer": "act"},
        "blocks.3.norm1": {"input_quantizer": "pre_ln"},
        "norm": {"input_quantizer": "pre_ln"},
    }
    for name, slots in expected.items():
        assert roles[name] == slots, name
    assert len(roles) == 1 + 12 * 8 + 1 + (12 * 2 + 1)  # points, then the LayerNorms


def test_swin_points_and_roles(models):
    roles = _roles(vitq.prepare(models["swin_tiny_patch4_window7_224"], QuantConfig(method="float")))
    linear = {"weight_quantizer": "weight"}
    expected = {
        "patch_embed.proj": {**linear, "input_quantizer": "image"},
        "layers.1.downsample.reduction": {**linear, "input_quantizer": "post_ln"},
        "layers.0.blocks.1.attn.qkv": {**linear, "input_quantizer": "post_ln"},
        "layers.0.blocks.1.attn.q": {"quantizer": "attn_q"},
        "layers.0.blocks.1.attn.k": {"quantizer": "attn_k"},
        "layers.0.blocks.1.attn.v": {"quantizer": "attn_v"},
        "layers.0.blocks.1.attn.softmax": {"quantizer": "softmax"},
        "layers.0.blocks.1.attn.proj": {**linear, "input_quantizer": "act"},
        "layers.0.blocks.1.mlp.fc1": {**linear, "input_quantizer": "post_ln"},
        "layers.0.blocks.1.mlp.fc2": {**linear, "input_quantizer": "post_gelu"},
        "head.fc": {**linear, "input_quantizer": "act"},
    }
    for name, slots in expected.items():
        assert roles[name] == slots, name
    assert "layers.0.downsample.reduction" not in roles  # stage 0 has no PatchMerging
    assert roles["layers.1.downsample.norm"] == roles["patch_embed.norm"] == {"input_quantizer": "pre_ln"}
    assert len(roles) == 1 + 1 + 4 * 8 + 1 + (1 + 4 * 2 + 1 + 1)  # points, then the LayerNorms


# ---------------------------------------------------------------------------- stages
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
@torch.no_grad()
def test_stages_compose_to_forward(models, images, name):
    qmodel = vitq.prepare(models[name], QuantConfig(method="float"))
    stages = qmodel.stages()
    x = images
    for stage in stages:
        x = stage.run(x)
    assert torch.equal(x, qmodel(images))
    # every quantization point belongs to exactly one stage
    for point in qmodel.points():
        owners = [s.name for s in stages if any(point == m or point.startswith(m + ".") for m in s.modules)]
        assert len(owners) == 1, (point, owners)


def test_swin_stage_names(models):
    stages = vitq.prepare(models["swin_tiny_patch4_window7_224"], QuantConfig(method="float")).stages()
    assert [s.name for s in stages] == ["embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample",
                                        "layers.1.blocks.0", "layers.1.blocks.1", "head"]


# ---------------------------------------------------------------------------- softmax on the path
@pytest.mark.parametrize(("name", "point"), [("deit_tiny_patch16_224", "blocks.0.attn.softmax"),
                                             ("swin_tiny_patch4_window7_224", "layers.0.blocks.1.attn.softmax")])
@torch.no_grad()
def test_softmax_point_is_on_the_path(models, images, name, point):
    """A 2-bit quantizer on one softmax point, alone enabled, must see the probabilities and change the logits
    (guards against a fused attention kernel bypassing the point)."""
    config = QuantConfig(method="minmax", w_bits=8, a_bits=8, overrides=[PointOverride(pattern=point, bits=2)])
    qmodel = vitq.prepare(models[name], config)
    softmax = qmodel.model.get_submodule(point)
    assert softmax.quantizer.bits == 2
    seen = []
    handle = softmax.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        with qmodel.quantization_disabled():
            float_out = qmodel(images)
            softmax.quantizer.enabled = True
            softmax.quantizer.calibrating = True  # calibrates on this forward, then quantizes
            quant_out = qmodel(images)
    finally:
        handle.remove()
    assert softmax.quantizer.is_calibrated
    assert len(seen) == 2
    assert torch.allclose(seen[0].sum(-1), torch.ones(()), atol=1e-5)  # it sees attention probabilities
    assert _max_diff(quant_out, float_out) > 1e-4


# ---------------------------------------------------------------------------- calibration
def test_swin_minmax_calibrates_every_quantizer(swin_quantized, images):
    quantizers = swin_quantized.quantizers()
    assert len(quantizers) == 2 * 19 + 4 * 4  # 19 Linear/Conv points x 2 slots + q/k/v/softmax x 4 blocks
    assert all(q.is_calibrated for q in quantizers.values())
    with torch.no_grad():
        out = swin_quantized(images)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- BatchNorm folding
@pytest.mark.parametrize("layer", ["conv", "depthwise", "linear"])
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_fold_batchnorm_keeps_the_function(layer, bias):
    """``bn(layer(x))`` before the fold equals ``layer'(x)`` after it (BatchNormAct2d keeps its activation)."""
    from timm.layers import BatchNormAct2d

    from vitq.models.base import fold_batchnorm

    torch.manual_seed(0)
    if layer == "linear":
        model, x = nn.Sequential(nn.Linear(5, 8, bias=bias), nn.BatchNorm1d(8)), torch.randn(4, 5)
    else:
        groups = 8 if layer == "depthwise" else 1
        model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=groups, bias=bias), BatchNormAct2d(8, act_layer=nn.Hardswish))
        x = torch.randn(2, 8, 7, 7)
    bn = model[1]
    bn.weight.uniform_(0.5, 2)
    bn.bias.uniform_(-1, 1)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    model.eval()
    reference = model(x)
    fold_batchnorm(model, "0", "1")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert torch.allclose(model(x), reference, atol=1e-5)
    with pytest.raises(ValueError, match="normalises 8 channels"):
        fold_batchnorm(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(8)), "0", "1")
