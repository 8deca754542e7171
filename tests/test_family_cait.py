"""CaiT specifics beyond the shared family checks (tests/test_families.py): the stacked class-attention qkv, what the
talking-heads softmax point sees and feeds, the float head mixes, the class-token stages, roles and tensor names."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_timm_model, rel_diff, run_stages, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.calib import search
from vitq.nn import QuantPoint
from vitq.nn.attention import QuantClassAttention, QuantTalkingHeadAttention
from vitq.quantizers import build_quantizer

NAME = "cait_xxs24_224"
SMALL = {"depth": 2, "img_size": 64, "init_values": 1.0}


def build(**kwargs) -> nn.Module:
    """A small random CaiT (seed 0, parameters nudged; timm's fused class attention off)."""
    return random_timm_model(NAME, **{**SMALL, **kwargs})


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    return seeded_randn(n, 3, size, size, seed=1)


def tokens(n: int = 2, count: int = 17, dim: int = 192) -> torch.Tensor:
    return seeded_randn(n, count, dim, seed=2)


@torch.no_grad()
def test_stacked_class_attention_qkv_is_timms_q_k_v():
    attn = build().blocks_token_only[0].attn
    wrapped = QuantClassAttention(copy.deepcopy(attn))
    dim = attn.q.in_features
    assert torch.equal(wrapped.qkv.weight, torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
    assert torch.equal(wrapped.qkv.bias, torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
    x = tokens()
    q, k, v = wrapped.qkv(x).split(dim, dim=-1)
    for ours, linear in ((q, attn.q), (k, attn.k), (v, attn.v)):
        assert torch.allclose(ours, linear(x), atol=1e-6)
    assert torch.allclose(q[:, 0], attn.q(x[:, 0]), atol=1e-6)  # timm's query: the class token's only


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_class_attention_computes_timms_output(fused):
    attn = build().blocks_token_only[1].attn
    wrapped = QuantClassAttention(copy.deepcopy(attn))
    attn.fused_attn = fused
    x = tokens()
    out = wrapped(x)
    assert out.shape == (2, 1, x.shape[-1])
    assert rel_diff(out, attn(x)) <= 1e-5


def test_stacked_qkv_without_biases_has_no_bias():
    attn = build(qkv_bias=False).blocks_token_only[0].attn
    wrapped = QuantClassAttention(attn)
    assert wrapped.qkv.bias is None
    with torch.no_grad():
        assert rel_diff(wrapped(tokens()), attn(tokens())) <= 1e-5


@torch.no_grad()
def test_talking_heads_attention_computes_timms_output():
    attn = build().blocks[1].attn
    wrapped = QuantTalkingHeadAttention(copy.deepcopy(attn))
    x = tokens(count=16)
    assert rel_diff(wrapped(x), attn(x)) <= 1e-5


@torch.no_grad()
def test_talking_heads_softmax_point_sees_probabilities_and_feeds_proj_w():
    """The softmax point quantizes the probabilities, before proj_w; proj_w reads the point's output, the only
    consumer of the probabilities; a coarse softmax quantizer changes the attention output."""
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    attn = qmodel.model.get_submodule("blocks.1.attn")
    seen: dict[str, torch.Tensor] = {}
    handles = [attn.softmax.register_forward_hook(lambda m, a, out: seen.update(probs=a[0], point=out)),
               attn.proj_w.register_forward_pre_hook(lambda m, a: seen.update(mixed_in=a[0]))]
    try:
        x = tokens(count=16)
        float_out = attn(x)
        attn.softmax.quantizer = build_quantizer({"kind": "uniform", "bits": 2})
        attn.softmax.quantizer.calibrating = True
        quant_out = attn(x)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(seen["probs"].sum(-1), torch.ones(()), atol=1e-5)
    assert torch.equal(seen["mixed_in"], seen["point"].permute(0, 2, 3, 1))
    assert rel_diff(quant_out, float_out) > 1e-3


def test_head_mixes_stay_float_with_timms_names():
    """proj_l / proj_w are plain Linears (no quantizer slot); the talking-heads tensors keep timm's names, the class
    attention's q/k/v become one qkv."""
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="minmax", w_bits=8, a_bits=8))
    attn = qmodel.model.get_submodule("blocks.0.attn")
    for mix in (attn.proj_l, attn.proj_w):
        assert type(mix) is nn.Linear and not isinstance(mix, QuantPoint)
    points = set(qmodel.points())
    assert {f"blocks.0.attn.{p}" for p in ("qkv", "q", "k", "v", "softmax", "proj")} <= points
    assert {f"blocks_token_only.1.attn.{p}" for p in ("qkv", "q", "k", "v", "softmax", "proj")} <= points
    assert not any("proj_l" in p or "proj_w" in p for p in points)

    keys = set(qmodel.model.state_dict())
    timm_keys = set(model.state_dict())
    assert {"blocks.0.attn.proj_l.weight", "blocks.0.attn.proj_w.bias", "blocks.0.attn.qkv.weight"} <= keys
    assert {"blocks_token_only.0.attn.qkv.weight", "blocks_token_only.0.attn.qkv.bias"} <= keys
    renamed = {f"blocks_token_only.{j}.attn.{p}.{t}"
               for j in (0, 1) for p in ("q", "k", "v") for t in ("weight", "bias")}
    assert timm_keys - keys == renamed  # every other timm tensor keeps its name
    assert not keys & renamed


def test_roles():
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    roles = {slot.name: slot.role for slot in qmodel.slots()}
    for block in ("blocks.1", "blocks_token_only.0"):
        assert roles[f"{block}.attn.qkv.input_quantizer"] == "post_ln"
        assert roles[f"{block}.mlp.fc1.input_quantizer"] == "post_ln"
        assert roles[f"{block}.attn.proj.input_quantizer"] == "act"
        assert roles[f"{block}.mlp.fc2.input_quantizer"] == "post_gelu"
        assert roles[f"{block}.attn.softmax.quantizer"] == "softmax"
    assert roles["head.input_quantizer"] == "act"
    assert roles["patch_embed.proj.input_quantizer"] == "image"


@torch.no_grad()
def test_class_attention_q_point_sees_the_class_token_only():
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    seen = []
    point = qmodel.model.get_submodule("blocks_token_only.0.attn.q")
    handle = point.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        qmodel(images())
    finally:
        handle.remove()
    assert seen[0].shape == (2, 4, 1, 48)  # [B, heads, 1, head_dim]


@torch.no_grad()
def test_stages_carry_the_class_token_through_the_class_attention_blocks():
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    names = [stage.name for stage in qmodel.stages()]
    assert names == ["embed", "blocks.0", "blocks.1", "cls_token", "blocks_token_only.0", "blocks_token_only.1",
                     "head"]
    out = images()
    for stage in qmodel.stages()[:-1]:
        out = stage.run(out)
    ref = model.forward_cls(model.blocks(model.pos_drop(model.patch_embed(images()) + model.pos_embed)))
    assert out.shape == ref.shape and rel_diff(out, ref) <= 1e-5


@torch.no_grad()
def test_pruned_model_has_no_class_token_stage():
    """After timm's prune_intermediate_layers (no class token, no class-attention blocks, no classifier) the stages
    still compose to the forward."""
    model = build()
    model.prune_intermediate_layers(indices=1)
    x = images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    assert [stage.name for stage in qmodel.stages()] == ["embed", "blocks.0", "blocks.1", "head"]
    out = run_stages(qmodel, x)
    assert torch.equal(out, qmodel(x))
    assert rel_diff(out, model(x)) <= 1e-5


@torch.no_grad()
def test_softmax_output_search_uses_the_head_mix(monkeypatch):
    """The attention-output search of a talking-heads softmax quantizer measures ‖proj_w(A)·v − proj_w(Q(A))·v‖."""
    attn = QuantTalkingHeadAttention(build().blocks[0].attn)
    attn.softmax.quantizer = build_quantizer({"kind": "uniform", "bits": 4})
    attn.softmax.quantizer.calibrating = True
    consumers = []

    def capture(quantizer, x, consumer, reference=None, *, chunk=None):
        consumers.append((x, consumer))
        quantizer.calibrate(x)
        return quantizer.get_params()

    monkeypatch.setattr(search, "search_by_output_error", capture)
    seen: dict[str, torch.Tensor] = {}
    handle = attn.v.register_forward_hook(lambda m, a, out: seen.update(v=out))
    try:
        with search.attention_output_calibration([attn]):
            attn(tokens(count=16))
    finally:
        handle.remove()
    (probs, consumer), = consumers
    expected = attn.proj_w(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) @ seen["v"]
    assert torch.allclose(consumer(probs, slice(None)), expected)
