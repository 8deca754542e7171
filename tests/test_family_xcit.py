"""XCiT specifics beyond the shared family checks (tests/test_families.py): cross-covariance attention and what its
points see, the folded patch-embedding BatchNorms and what stays float, the grid-image stages at other image sizes,
which fold pairs keep the function, the Hessian search's context gradient layout, roles and tensor names."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_timm_model, rel_diff, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.methods.ptq4vit.products import ContextProduct
from vitq.methods.repq_vit.reparam import apply_fold
from vitq.nn import QConv2d, QuantPoint
from vitq.nn.attention import QuantXCAttention
from vitq.quantizers import build_quantizer

NAME = "xcit_nano_12_p16_224"
SMALL = {"depth": 2, "img_size": 64}


def _nudge_statistics(norm: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    norm.running_mean.add_(torch.randn(norm.running_mean.shape, generator=gen) * 0.1)
    norm.running_var.mul_(torch.rand(norm.running_var.shape, generator=gen) + 0.5)


def build(**kwargs) -> nn.Module:
    """A small random XCiT (seed 0), parameters and BatchNorm statistics nudged so that zero- or one-initialised
    biases, temperatures and running statistics take part; timm's fused XCA off unless a test asks for it."""
    return random_timm_model(NAME, batchnorm=_nudge_statistics, **{**SMALL, **kwargs})


def images(n: int = 2, height: int = 64, width: int = 64) -> torch.Tensor:
    return seeded_randn(n, 3, height, width, seed=1)


def tokens(n: int = 2, count: int = 16, dim: int = 128) -> torch.Tensor:
    return seeded_randn(n, count, dim, seed=2)


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_xca_computes_timms_output(fused):
    attn = build().blocks[1].attn
    wrapped = QuantXCAttention(copy.deepcopy(attn))
    attn.fused_attn = fused
    x = tokens()
    assert rel_diff(wrapped(x), attn(x)) <= 1e-5


@torch.no_grad()
def test_xca_points_see_normalised_operands_and_channel_probabilities():
    """q and k are unit vectors over the tokens, per head and channel; the softmax point sees [B, heads, C', C']
    probabilities; the temperature acts after the product (it is not in q); a coarse softmax quantizer changes the
    output."""
    attn = QuantXCAttention(copy.deepcopy(build().blocks[0].attn))
    heads, head_dim, count = attn.num_heads, 128 // attn.num_heads, 16
    seen: dict[str, torch.Tensor] = {}
    handles = [getattr(attn, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, a[0]))
               for name in ("q", "k", "v", "softmax")]
    try:
        x = tokens(count=count)
        float_out = attn(x)
        attn.softmax.quantizer = build_quantizer({"kind": "uniform", "bits": 2})
        attn.softmax.quantizer.calibrating = True
        quant_out = attn(x)
    finally:
        for handle in handles:
            handle.remove()
    for name in ("q", "k", "v"):
        assert seen[name].shape == (2, heads, head_dim, count)
    for name in ("q", "k"):
        assert torch.allclose(seen[name].norm(dim=-1), torch.ones(()), atol=1e-5)
    assert seen["softmax"].shape == (2, heads, head_dim, head_dim)
    assert torch.allclose(seen["softmax"].sum(-1), torch.ones(()), atol=1e-5)
    scores = (seen["q"] @ seen["k"].transpose(-2, -1)) * attn.temperature
    assert torch.allclose(scores.softmax(-1), seen["softmax"], atol=1e-6)
    assert rel_diff(quant_out, float_out) > 1e-3


def test_batchnorms_folded_or_float_and_position_encoding_float():
    """The patch embedding's BatchNorms are folded into its convs (point per conv, the first reads the image); LPI's
    BatchNorm stays a float module between its two quantized depthwise convs; the Fourier encoding's 1×1 conv is no
    point."""
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    embed = qmodel.model.patch_embed.proj
    for index in (0, 2, 4, 6):
        assert isinstance(embed[index][0], QConv2d) and isinstance(embed[index][1], nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in embed.modules())
    lpi = qmodel.model.blocks[0].local_mp
    assert isinstance(lpi.conv1, QConv2d) and isinstance(lpi.conv2, QConv2d) and lpi.conv1.groups == 128
    assert type(lpi.bn) is nn.BatchNorm2d
    projection = qmodel.model.pos_embed.token_projection
    assert type(projection) is nn.Conv2d and not isinstance(projection, QuantPoint)
    assert not any(p.startswith("pos_embed") for p in qmodel.points())
    with torch.no_grad():
        assert rel_diff(qmodel(images()), model(images())) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("size", [(96, 96), (64, 112)])
def test_stages_follow_the_token_grid_of_any_image_size(size):
    """timm's XCiT takes any multiple of the patch size; the stages carry the grid, so they compose to the forward
    there too (non-square included)."""
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    x = images(height=size[0], width=size[1])
    out = x
    for stage in qmodel.stages():
        out = stage.run(out)
        if stage.name == "embed":
            assert out.shape == (2, 128, size[0] // 16, size[1] // 16)
    assert torch.equal(out, qmodel(x))


def _random_fold(qmodel, norm: str, linear: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    channels = qmodel.model.get_submodule(norm).weight.numel()
    ratio = torch.rand(channels, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    shift = torch.randn(channels, generator=gen, dtype=torch.float64) * 0.5
    apply_fold(qmodel.model.get_submodule(norm), qmodel.model.get_submodule(linear), ratio, shift)


@torch.no_grad()
def test_listed_fold_pairs_keep_the_function_and_class_attention_norms_would_not():
    """A random per-channel affine map folded into every listed pair leaves the logits unchanged; the same fold into a
    class-attention block's norm1 → qkv (left out: norm1's output is also the patch tokens' residual update) does
    not."""
    model = build()
    x = images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    pairs = qmodel.norm_linear_pairs()
    assert pairs == [(f"blocks.{i}.{norm}", f"blocks.{i}.{linear}")
                     for i in (0, 1) for norm, linear in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))]
    for seed, (norm, linear) in enumerate(pairs):
        _random_fold(qmodel, norm, linear, seed)
    assert rel_diff(qmodel(x), model(x)) <= 1e-4

    unlisted = vitq.prepare(model, QuantConfig(method="float"))
    _random_fold(unlisted, "cls_attn_blocks.0.norm1", "cls_attn_blocks.0.attn.qkv", 0)
    assert rel_diff(unlisted(x), model(x)) > 1e-2


def test_hessian_search_context_gradient_has_the_product_layout():
    """ptq4vit's ``A·v`` product of XCA is [B, heads, C', N]; the gradient it captures at ``proj``'s input is split
    into that layout (the transpose of the token-attention one)."""
    attn = QuantXCAttention(copy.deepcopy(build().blocks[0].attn))
    product = ContextProduct("blocks.0.attn.context", attn, row_stride=1)
    captured: dict[str, torch.Tensor] = {}
    grads: list[torch.Tensor] = []
    handles = [attn.softmax.register_forward_hook(lambda m, a, out: captured.__setitem__("a", out)),
               attn.v.register_forward_hook(lambda m, a, out: captured.__setitem__("v", out)),
               attn.proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("proj_in", a[0])),
               *product.gradient_hooks(grads.append)]
    try:
        x = tokens().requires_grad_()
        out = attn(x)
        proj_in = captured["proj_in"]
        (grad_in,) = torch.autograd.grad(out.square().sum(), proj_in, retain_graph=True)
        out.square().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        context = product.op(captured["a"], captured["v"])
    B, N, C = proj_in.shape
    assert grads[0].shape == context.shape == (B, attn.num_heads, C // attn.num_heads, N)
    assert torch.equal(grads[0], grad_in.reshape(B, N, attn.num_heads, -1).permute(0, 2, 3, 1))
    assert torch.equal(context.permute(0, 3, 1, 2).reshape(B, N, C), proj_in.detach())


def test_roles():
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    roles = {slot.name: slot.role for slot in qmodel.slots()}
    assert roles["patch_embed.proj.0.0.input_quantizer"] == "image"
    for index in (2, 4, 6):
        assert roles[f"patch_embed.proj.{index}.0.input_quantizer"] == "act"
    for block in ("blocks.1", "cls_attn_blocks.0"):
        assert roles[f"{block}.attn.qkv.input_quantizer"] == "post_ln"
        assert roles[f"{block}.mlp.fc1.input_quantizer"] == "post_ln"
        assert roles[f"{block}.attn.proj.input_quantizer"] == "act"
        assert roles[f"{block}.mlp.fc2.input_quantizer"] == "post_gelu"
        assert roles[f"{block}.attn.softmax.quantizer"] == "softmax"
    assert roles["blocks.1.local_mp.conv1.input_quantizer"] == "act"
    assert roles["blocks.1.local_mp.conv2.input_quantizer"] == "act"
    assert roles["head.input_quantizer"] == "act"


def test_tensor_names():
    """Only the folded patch-embedding BatchNorms and the stacked class-attention q/k/v change names."""
    model = build()
    keys = set(vitq.prepare(model, QuantConfig(method="minmax", w_bits=8, a_bits=8)).model.state_dict())
    timm_keys = set(model.state_dict())
    folded = {k for k in timm_keys if k.startswith("patch_embed.proj.") and ".1." in k}
    stacked = {f"cls_attn_blocks.{j}.attn.{p}.{t}" for j in (0, 1) for p in "qkv" for t in ("weight", "bias")}
    assert timm_keys - keys == folded | stacked
    added = {k for k in keys - timm_keys if "quantizer" not in k}
    assert added == {f"patch_embed.proj.{i}.0.bias" for i in (0, 2, 4, 6)} | \
        {f"cls_attn_blocks.{j}.attn.qkv.{t}" for j in (0, 1) for t in ("weight", "bias")}
    assert {"blocks.0.attn.temperature", "blocks.0.local_mp.bn.running_var",
            "pos_embed.token_projection.weight"} <= keys
