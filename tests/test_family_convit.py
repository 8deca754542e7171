"""ConViT specifics beyond the shared family checks (tests/test_families.py): gated positional self-attention (the
stacked q/k/v, the positional table, what the softmax point sees, the Hessian search's score gradient), the MHSA
blocks, the class-token stage, fold pairs, roles and tensor names."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import apply_random_folds, random_timm_model, rel_diff, run_stages, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.errors import VitqError
from vitq.methods.ptq4vit.products import ScoresProduct
from vitq.nn import QuantAttention
from vitq.nn.attention import QuantGatedPositionalAttention
from vitq.quantizers import build_quantizer

NAME = "convit_tiny"
SMALL = {"depth": 2, "local_up_to_layer": 1, "img_size": 64}


def build(**kwargs) -> nn.Module:
    """A small random ConViT (seed 0): one GPSA block then one MHSA block; parameters nudged so that constant
    initialisations (gates, identity v, the local position projection) take part."""
    return random_timm_model(NAME, **{**SMALL, **kwargs})


def images(n: int = 2) -> torch.Tensor:
    return seeded_randn(n, 3, 64, 64, seed=1)


def tokens(n: int = 2, count: int = 16, dim: int = 192) -> torch.Tensor:
    return seeded_randn(n, count, dim, seed=2)


@torch.no_grad()
@pytest.mark.parametrize("count", [16, 49])
def test_gpsa_computes_timms_output_and_position_table(count):
    attn = build().blocks[0].attn
    wrapped = QuantGatedPositionalAttention(copy.deepcopy(attn))
    x = tokens(count=count)
    assert rel_diff(wrapped(x), attn(x)) <= 1e-5
    assert torch.equal(wrapped.rel_indices, attn.get_rel_indices(count))
    assert torch.equal(wrapped.qkv.weight, torch.cat([attn.qk.weight, attn.v.weight]))


@torch.no_grad()
def test_gpsa_softmax_point_sees_the_mixed_map():
    """The softmax point's input is timm's final attention map (gated mix, renormalised); ``score_probs`` sees the
    content probabilities; a coarse softmax quantizer changes the output."""
    attn = build().blocks[0].attn
    wrapped = QuantGatedPositionalAttention(copy.deepcopy(attn))
    seen: dict[str, torch.Tensor] = {}
    handles = [wrapped.softmax.register_forward_hook(lambda m, a, out: seen.__setitem__("mixed", a[0])),
               wrapped.score_probs.register_forward_hook(lambda m, a, out: seen.__setitem__("content", a[0])),
               wrapped.q.register_forward_hook(lambda m, a, out: seen.__setitem__("q", out)),
               wrapped.k.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out))]
    try:
        x = tokens()
        float_out = wrapped(x)
        wrapped.softmax.quantizer = build_quantizer({"kind": "uniform", "bits": 2})
        wrapped.softmax.quantizer.calibrating = True
        quant_out = wrapped(x)
    finally:
        for handle in handles:
            handle.remove()
    attn(x)  # timm computes its position table for the token count on its first forward
    assert torch.allclose(seen["mixed"], attn.get_attention(x), atol=1e-6)
    assert torch.allclose(seen["mixed"].sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(seen["content"], (seen["q"] @ seen["k"].transpose(-2, -1)).softmax(-1), atol=1e-6)
    assert not torch.allclose(seen["content"], seen["mixed"], atol=1e-3)
    assert rel_diff(quant_out, float_out) > 1e-3


def test_hessian_search_score_gradient_goes_through_the_content_softmax():
    """ptq4vit's gradient of the scores S = Q(q·scale)·Q(k)ᵀ satisfies ∂L/∂Q(q) = ∂L/∂S · Q(k): it is taken at the
    content softmax, not at the mixed map."""
    wrapped = QuantGatedPositionalAttention(copy.deepcopy(build().blocks[0].attn))
    product = ScoresProduct("blocks.0.attn.scores", wrapped, row_stride=1)
    grads: list[torch.Tensor] = []
    seen: dict[str, torch.Tensor] = {}

    def keep_q(_module, _args, out):
        seen["q"] = out
        out.register_hook(lambda grad: seen.__setitem__("q_grad", grad))

    handles = [wrapped.q.register_forward_hook(keep_q),
               wrapped.k.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out.detach())),
               *product.gradient_hooks(grads.append)]
    try:
        x = tokens().requires_grad_()
        wrapped(x).square().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(grads[0] @ seen["k"], seen["q_grad"], rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_mhsa_blocks_are_vit_attention():
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    attn = qmodel.model.blocks[1].attn
    assert isinstance(attn, QuantAttention) and isinstance(qmodel.model.blocks[0].attn, QuantGatedPositionalAttention)
    x = tokens(count=17)
    assert rel_diff(attn(x), model.blocks[1].attn(x)) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("local_up_to_layer", [1, 2])
def test_class_token_stage_where_timm_prepends_it(local_up_to_layer):
    """The class token is prepended before the first MHSA block; a model of GPSA blocks only has no class-token
    stage (timm never prepends it there). The stages compose to the forward either way."""
    model = build(local_up_to_layer=local_up_to_layer)
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    x = images()
    assert rel_diff(qmodel(x), model(x)) <= 1e-5
    names = [stage.name for stage in qmodel.stages()]
    expected = ["embed", "blocks.0", "cls_token", "blocks.1", "head"] if local_up_to_layer == 1 else \
        ["embed", "blocks.0", "blocks.1", "head"]
    assert names == expected
    out = run_stages(qmodel, x)
    assert torch.equal(out, qmodel(x))


@torch.no_grad()
def test_listed_fold_pairs_keep_the_function():
    """A random per-channel affine map folded into every listed pair (GPSA and MHSA) leaves the logits unchanged."""
    model = build()
    x = images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    pairs = qmodel.norm_linear_pairs()
    assert pairs == [(f"blocks.{i}.{norm}", f"blocks.{i}.{linear}")
                     for i in (0, 1) for norm, linear in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))]
    apply_random_folds(qmodel, pairs)
    assert rel_diff(qmodel(x), model(x)) <= 1e-4


def test_roles_and_tensor_names():
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="minmax", w_bits=8, a_bits=8))
    roles = {slot.name: slot.role for slot in qmodel.slots()}
    for block in ("blocks.0", "blocks.1"):
        assert roles[f"{block}.attn.qkv.input_quantizer"] == "post_ln"
        assert roles[f"{block}.mlp.fc1.input_quantizer"] == "post_ln"
        assert roles[f"{block}.attn.proj.input_quantizer"] == "act"
        assert roles[f"{block}.mlp.fc2.input_quantizer"] == "post_gelu"
        assert roles[f"{block}.attn.softmax.quantizer"] == "softmax"
    assert roles["patch_embed.proj.input_quantizer"] == "image"
    assert roles["head.input_quantizer"] == "act"
    assert not any("pos_proj" in point for point in qmodel.points())

    keys = {k for k in qmodel.model.state_dict() if "quantizer" not in k}
    timm_keys = set(model.state_dict())
    assert timm_keys - keys == {"blocks.0.attn.qk.weight", "blocks.0.attn.v.weight"}  # convit: no qkv bias
    assert keys - timm_keys == {"blocks.0.attn.qkv.weight"}
    assert {"blocks.0.attn.pos_proj.weight", "blocks.0.attn.gating_param", "pos_embed", "cls_token"} <= keys


def test_hybrid_backbone_is_refused_in_one_line():
    from timm.models.convit import ConVit

    model = ConVit(img_size=64, embed_dim=16, num_heads=4, depth=1,
                   hybrid_backbone=nn.Sequential(nn.Conv2d(3, 8, 16, 16))).eval()
    with pytest.raises(VitqError, match="hybrid"):
        vitq.prepare(model, QuantConfig(method="float"), model_name=NAME)
