"""TinyViT specifics beyond the shared family checks (tests/test_families.py): BatchNorm folding, the roles of the
conv points, the learned attention bias, padded windows, the stage layouts and the tensor names."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_batchnorm_statistics, random_timm_model, rel_diff, run_stages, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.models.base import fold_batchnorm
from vitq.nn import QConv2d, QLayerNorm, QuantPoint
from vitq.nn.attention import QuantTinyVitAttention

NAME = "tiny_vit_5m_224"
SMALL = {"depths": (1, 1, 2, 1), "window_sizes": (7, 4, 4, 2), "num_classes": 10}


def build(**kwargs) -> nn.Module:
    """A small random TinyViT (seed 0), parameters nudged and random BatchNorm statistics, so that the
    zero-initialised attention biases and the BatchNorm folds are not trivial; timm's fused attention off."""
    return random_timm_model(NAME, batchnorm=random_batchnorm_statistics(0.5), **{**SMALL, **kwargs})


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    return seeded_randn(n, 3, size, size, seed=1)


@torch.no_grad()
def test_folded_conv_norm_is_timms_fuse():
    """fold_batchnorm on a TinyViT ConvNorm (depthwise here) computes what timm's own ConvNorm.fuse() builds."""
    model = build()
    conv_norm = model.stages[1].blocks[0].local_conv
    fused = conv_norm.fuse()
    fold_batchnorm(model, "stages.1.blocks.0.local_conv.conv", "stages.1.blocks.0.local_conv.bn")
    assert isinstance(conv_norm.bn, nn.Identity)
    assert torch.allclose(conv_norm.conv.weight, fused.weight, atol=1e-6)
    assert torch.allclose(conv_norm.conv.bias, fused.bias, atol=1e-6)
    x = torch.randn(2, 128, 8, 8)
    assert torch.allclose(conv_norm(x), fused(x), atol=1e-5)


@torch.no_grad()
def test_wrap_folds_every_batchnorm_and_keeps_the_function():
    model = build()
    x = images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qmodel.model.modules())
    assert rel_diff(qmodel(x), model(x)) <= 1e-5
    model.train()  # wrapping folds the running statistics whatever the mode: the quantized model is the eval one
    assert rel_diff(vitq.prepare(model, QuantConfig(method="float"))(x), qmodel(x)) <= 1e-6


def test_conv_points_and_roles():
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    roles = {slot.name: slot.role for slot in qmodel.slots()}
    convs = [name for name, m in qmodel.model.named_modules() if isinstance(m, QConv2d)]
    plain = [name for name, m in qmodel.model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert not plain  # every conv and Linear is a quantization point
    assert len(convs) == 2 + 3 * 1 + 3 * 3 + 4  # stem, MBConv, patch mergings, local convs of the attention blocks
    assert roles["patch_embed.conv1.conv.input_quantizer"] == "image"
    assert all(roles[f"{conv}.input_quantizer"] == "act" for conv in convs if conv != "patch_embed.conv1.conv")
    depthwise = qmodel.model.get_submodule("stages.0.blocks.0.conv2.conv")
    assert depthwise.groups == depthwise.weight.shape[0] > 1
    block = "stages.2.blocks.1"
    assert roles[f"{block}.attn.qkv.input_quantizer"] == "post_ln"
    assert roles[f"{block}.attn.proj.input_quantizer"] == "act"
    assert roles[f"{block}.mlp.fc1.input_quantizer"] == "post_ln"
    assert roles[f"{block}.mlp.fc2.input_quantizer"] == "post_gelu"
    assert roles[f"{block}.attn.softmax.quantizer"] == "softmax"
    assert roles[f"{block}.attn.norm.input_quantizer"] == "pre_ln"
    assert roles["head.fc.input_quantizer"] == "act"
    assert not isinstance(qmodel.model.head.norm, QLayerNorm)  # LayerNorm2d over NCHW channels stays timm's


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_attention_computes_timms_output_with_its_bias(fused):
    attn = build().stages[2].blocks[0].attn
    wrapped = QuantTinyVitAttention(copy.deepcopy(attn))
    attn.fused_attn = fused
    x = seeded_randn(3, 16, 160, seed=2)
    assert rel_diff(wrapped(x), attn(x)) <= 1e-5
    wrapped.attention_biases.add_(torch.randn(wrapped.attention_biases.shape))
    assert rel_diff(wrapped(x), attn(x)) > 1e-3  # the bias takes part


@torch.no_grad()
def test_attention_bias_is_added_to_the_scores_in_float():
    """Under W8A8 the softmax input is Q(q·scale) Q(k)ᵀ + the gathered table, unquantized."""
    qmodel = vitq.quantize(build(), QuantConfig(method="minmax", w_bits=8, a_bits=8, calib_size=2), images(),
                           model_name=NAME, progress=False)
    attn = qmodel.model.get_submodule("stages.1.blocks.0.attn")
    seen: dict[str, torch.Tensor] = {}
    handles = [attn.q.register_forward_hook(lambda m, a, out: seen.update(q=out)),
               attn.k.register_forward_hook(lambda m, a, out: seen.update(k=out)),
               attn.softmax.register_forward_pre_hook(lambda m, a: seen.update(probs=a[0]))]
    try:
        qmodel(images())
    finally:
        for handle in handles:
            handle.remove()
    bias = attn.attention_biases[:, attn.attention_bias_idxs]
    assert bias.shape == (attn.num_heads, 16, 16)
    scores = seen["q"] @ seen["k"].transpose(-2, -1) + bias
    assert torch.allclose(seen["probs"], scores.softmax(-1), atol=1e-6)
    assert not any("attention_bias" in point for point in qmodel.points())


@torch.no_grad()
def test_padded_windows():
    """Windows that do not divide the grid (timm pads with zeros before the attention's LayerNorm): the float
    function is timm's and the LayerNorm output is still qkv's whole input."""
    model = build(window_sizes=(7, 3, 3, 3))
    x = images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    assert rel_diff(qmodel(x), model(x)) <= 1e-5
    attn = qmodel.model.get_submodule("stages.1.blocks.0.attn")
    seen: dict[str, torch.Tensor] = {}
    handles = [attn.norm.register_forward_hook(lambda m, a, out: seen.update(norm=out)),
               attn.qkv.register_forward_pre_hook(lambda m, a: seen.update(qkv=a[0]))]
    try:
        qmodel(x)
    finally:
        for handle in handles:
            handle.remove()
    assert seen["qkv"].shape == (2 * 9, 9, 128)  # 8x8 grid padded to 9x9: nine 3x3 windows per image
    assert torch.equal(seen["norm"], seen["qkv"])


@torch.no_grad()
def test_stages_and_layouts():
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    stages = qmodel.stages()
    assert [s.name for s in stages] == [
        "patch_embed", "stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0", "stages.2.downsample",
        "stages.2.blocks.0", "stages.2.blocks.1", "stages.3.downsample", "stages.3.blocks.0", "head"]
    shapes = []
    out = images()
    for stage in stages:
        out = stage.run(out)
        shapes.append(tuple(out.shape))
    assert shapes[1] == (2, 64, 16, 16)  # NCHW through the MBConv stage
    assert shapes[2] == shapes[3] == (2, 8, 8, 128)  # NHWC from the patch merging on
    assert torch.equal(out, qmodel(images()))


@torch.no_grad()
def test_pruned_model_stages_compose():
    model = build()
    model.prune_intermediate_layers(indices=2)
    x = images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    out = run_stages(qmodel, x)
    assert torch.equal(out, qmodel(x))
    assert rel_diff(out, model(x)) <= 1e-5


def test_tensor_names():
    """Folding removes the bn tensors and gives each conv a bias; every other timm tensor keeps its name."""
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="minmax", w_bits=8, a_bits=8))
    keys = {k for k in qmodel.model.state_dict() if "quantizer" not in k}
    timm_keys = set(model.state_dict())
    assert all(".bn." in k for k in timm_keys - keys)
    assert all(k.endswith(".conv.bias") for k in keys - timm_keys)
    assert {"stages.1.blocks.0.attn.attention_biases", "stages.1.blocks.0.attn.qkv.weight"} <= keys
    assert all(isinstance(m, QuantPoint) for name, m in qmodel.model.named_modules() if name.endswith(".conv"))


def test_ptq4vit_context_product_accepts_the_norm_before_qkv():
    """The Hessian search's attention-output product refuses a norm between the attention output and proj (EVA's
    scale_attn_inner), not TinyViT's norm before qkv."""
    from timm.layers import Attention

    from vitq.errors import VitqError
    from vitq.methods.ptq4vit.products import ContextProduct
    from vitq.nn import QuantAttention

    tinyvit = QuantTinyVitAttention(build().stages[1].blocks[0].attn)
    assert not tinyvit.norm_before_proj()
    ContextProduct("tinyvit.context", tinyvit, 1)
    inner = QuantAttention(Attention(64, num_heads=2, scale_norm=True, norm_layer=nn.LayerNorm))
    assert inner.norm_before_proj()
    with pytest.raises(VitqError, match="norm before proj"):
        ContextProduct("eva.context", inner, 1)
