"""Swin V2 specifics beyond the shared family checks (tests/test_families.py): what the cosine-attention points see,
the clamped logit scale, padded and dynamic-size windows, the input roles of post-norm blocks and the state_dict."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_timm_model, rel_diff, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.nn import QuantPoint
from vitq.nn.attention import QuantCosineWindowAttention

NAME = "swinv2_tiny_window8_256"
SMALL = {"embed_dim": 48, "depths": (2, 2), "num_heads": (3, 6)}


def build(**kwargs) -> nn.Module:
    """A small random Swin V2 (seed 0), parameters nudged so the zero-initialised post-norms and q/v biases take
    part."""
    return random_timm_model(NAME, **{**SMALL, **kwargs})


def images(size: int, n: int = 2) -> torch.Tensor:
    return seeded_randn(n, 3, size, size, seed=1)


@torch.no_grad()
@pytest.mark.parametrize("kwargs, size", [
    ({"img_size": 96}, 96),  # stage 1 is 12×12 tokens: windows of 8 pad it, and its odd blocks shift
    ({"img_size": 64, "strict_img_size": False}, 80),  # masks built per forward for a size the model was not made for
])
def test_padded_and_dynamic_windows_keep_the_float_function(kwargs, size):
    model = build(**kwargs)
    x = images(size)
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    assert rel_diff(qmodel(x), model(x)) <= 1e-5


@torch.no_grad()
def test_logit_scale_is_clamped_as_in_timm():
    """Heads whose learned logit scale exceeds log(100) are clamped to a factor of 100, in the wrapped model too."""
    model = build(img_size=64)
    with torch.no_grad():
        model.layers[0].blocks[0].attn.logit_scale[0] = 7.0
        model.layers[1].blocks[1].attn.logit_scale[:] = math.log(100.0) + 0.5
    x = images(64)
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    attn = qmodel.model.get_submodule("layers.0.blocks.0.attn")
    assert isinstance(attn, QuantCosineWindowAttention)
    assert torch.allclose(attn._get_logit_scale()[0], torch.tensor(100.0))
    assert rel_diff(qmodel(x), model(x)) <= 1e-5


@torch.no_grad()
def test_q_and_k_points_see_unit_vectors():
    """The q/k points are the operands of the cosine product: each head's query/key row has norm 1, so an 8-bit
    q quantizer's range stays within [-1, 1] whatever the logit scale."""
    model = build(img_size=64)
    x = images(64)
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    seen: dict[str, torch.Tensor] = {}
    handles = [qmodel.model.get_submodule(f"layers.0.blocks.1.attn.{p}").register_forward_pre_hook(
        lambda m, args, key=p: seen.__setitem__(key, args[0])) for p in ("q", "k")]
    try:
        qmodel(x)
    finally:
        for handle in handles:
            handle.remove()
    for key in ("q", "k"):
        assert torch.allclose(seen[key].norm(dim=-1), torch.ones(()), atol=1e-5), key

    config = QuantConfig(method="minmax", w_bits=8, a_bits=8, calib_size=2)
    quantized = vitq.quantize(model, config, x, model_name=NAME, progress=False)
    q = quantized.model.get_submodule("layers.0.blocks.1.attn.q").quantizer
    assert q is not None and float(q.scale.max()) * 255 <= 2.0 + 1e-4


def test_post_norm_inputs_are_act_and_the_position_mlp_stays_float():
    model = build(img_size=64)
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    roles = {slot.name: slot.role for slot in qmodel.slots()}
    for point in ("layers.0.blocks.0.attn.qkv", "layers.1.blocks.1.mlp.fc1", "layers.1.downsample.reduction",
                  "layers.0.blocks.0.attn.proj", "head.fc"):
        assert roles[f"{point}.input_quantizer"] == "act", point
    assert roles["layers.0.blocks.0.mlp.fc2.input_quantizer"] == "post_gelu"
    assert "post_ln" not in roles.values()
    assert qmodel.norm_linear_pairs() == []
    assert not any(".cpb_mlp" in name for name in qmodel.points())
    mlp = qmodel.model.get_submodule("layers.0.blocks.0.attn.cpb_mlp")
    assert not any(isinstance(m, QuantPoint) for m in mlp.modules())


@torch.no_grad()
def test_state_dict_merges_the_q_and_v_biases():
    """Only the separate q/v biases change names: they become ``attn.qkv.bias`` = ``[q_bias | 0 | v_bias]``."""
    model = build(img_size=64)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    state = qmodel.model.state_dict()
    merged = {k for k in reference if k.endswith((".attn.q_bias", ".attn.v_bias"))}
    added = {k for k in state if k.endswith(".attn.qkv.bias")}
    assert set(state) == (set(reference) - merged) | added
    assert len(added) == 4 and len(merged) == 8
    for key in added:
        prefix = key.removesuffix("qkv.bias")
        q_bias, v_bias = reference[prefix + "q_bias"], reference[prefix + "v_bias"]
        assert torch.equal(state[key], torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
    for key in set(reference) - merged:
        assert torch.equal(state[key], reference[key]), key
