"""PiT specifics beyond the shared family checks (tests/test_families.py): the pooling layers' points and stages, the
token counts between stages, the distilled models' two class tokens and heads, fold pairs, roles and tensor names."""

from __future__ import annotations

import torch
from helpers import apply_random_folds, random_timm_model, rel_diff, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.nn import QConv2d, QLinear, QuantAttention

SMALL = {"depth": (1, 2, 1), "img_size": 64}


def build(name: str = "pit_ti_224", **kwargs) -> nn.Module:
    """A small random PiT (seed 0, parameters nudged; timm's fused attention off)."""
    return random_timm_model(name, **{**SMALL, **kwargs})


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    return seeded_randn(n, 3, size, size, seed=1)


def test_pooling_points_and_attention():
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    for i in (1, 2):
        pool = qmodel.model.transformers[i].pool
        assert isinstance(pool.conv, QConv2d) and isinstance(pool.fc, QLinear)
        assert pool.conv.groups == pool.conv.weight.shape[0] // 2  # two output channels per input channel
    assert qmodel.model.transformers[0].pool is None
    assert all(isinstance(block.attn, QuantAttention)
               for transformer in qmodel.model.transformers for block in transformer.blocks)


@torch.no_grad()
def test_stages_carry_class_and_patch_tokens_through_the_pools():
    """Between stages: ``cat(class token, patch tokens)``, 1 + 7·7, then 1 + 4·4 and 1 + 2·2 after each pool, the
    widths of timm's stages; the stages compose to the forward."""
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    x = images()
    shapes = {}
    out = x
    for stage in qmodel.stages():
        out = stage.run(out)
        shapes[stage.name] = tuple(out.shape)
    assert shapes["embed"] == (2, 50, 64)
    assert shapes["transformers.1.pool"] == (2, 17, 128)
    assert shapes["transformers.2.pool"] == (2, 5, 256)
    assert [name for name in shapes if "pool" in name] == ["transformers.1.pool", "transformers.2.pool"]
    assert torch.equal(out, qmodel(x))


@torch.no_grad()
def test_distilled_model_two_class_tokens_and_heads():
    model = build("pit_ti_distilled_224")
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    x = images()
    assert rel_diff(qmodel(x), model(x)) <= 1e-5
    out = x
    for stage in qmodel.stages():
        out = stage.run(out)
        if stage.name == "embed":
            assert out.shape[1] == 2 + 49
    assert torch.equal(out, qmodel(x))
    assert isinstance(qmodel.model.head_dist, QLinear)
    roles = {slot.name: slot.role for slot in qmodel.slots()}
    assert roles["head_dist.input_quantizer"] == "act"


@torch.no_grad()
def test_listed_fold_pairs_keep_the_function():
    """A random per-channel affine map folded into every listed pair leaves the logits unchanged."""
    model = build()
    x = images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    pairs = qmodel.norm_linear_pairs()
    blocks = [(0, 0), (1, 0), (1, 1), (2, 0)]
    assert pairs == [(f"transformers.{i}.blocks.{j}.{norm}", f"transformers.{i}.blocks.{j}.{linear}")
                     for i, j in blocks for norm, linear in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))]
    apply_random_folds(qmodel, pairs)
    assert rel_diff(qmodel(x), model(x)) <= 1e-4


def test_roles_and_tensor_names():
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="minmax", w_bits=8, a_bits=8))
    roles = {slot.name: slot.role for slot in qmodel.slots()}
    assert roles["patch_embed.conv.input_quantizer"] == "image"
    assert roles["transformers.1.pool.conv.input_quantizer"] == "act"
    assert roles["transformers.1.pool.fc.input_quantizer"] == "act"
    block = "transformers.1.blocks.1"
    assert roles[f"{block}.attn.qkv.input_quantizer"] == "post_ln"
    assert roles[f"{block}.mlp.fc1.input_quantizer"] == "post_ln"
    assert roles[f"{block}.attn.proj.input_quantizer"] == "act"
    assert roles[f"{block}.mlp.fc2.input_quantizer"] == "post_gelu"
    assert roles[f"{block}.attn.softmax.quantizer"] == "softmax"
    assert roles["head.input_quantizer"] == "act"
    keys = {k for k in qmodel.model.state_dict() if "quantizer" not in k}
    assert keys == set(model.state_dict())
