"""EfficientViT (MSRA) specifics beyond the shared family checks (tests/test_families.py): BatchNorm folding (the
convolutions' and the classifier's), windows that partition and pad the feature map, what the per-head points of
cascaded group attention see, the searches that use them, roles and tensor names."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import count_calls, random_batchnorm_statistics, random_timm_model, rel_diff, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.calib.runner import calibrating
from vitq.methods.ptq4vit.products import ContextProduct, ScoresProduct, stage_products, task_gradients
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantCascadedGroupAttention, QuantCascadedHead

NAME = "efficientvit_m0"
#: two stages of one block each
SMALL = {"embed_dim": (64, 128), "key_dim": (16, 16), "depth": (1, 1), "num_heads": (4, 4), "window_size": (7, 7),
         "down_ops": (("", 1), ("subsample", 2))}


def build(size: int = 64, **kwargs) -> nn.Module:
    """A random EfficientViT M0 (seed 0) for ``size`` px images with timm's arguments ``kwargs`` (default:
    ``SMALL``), parameters nudged and random BatchNorm statistics, so that the folds are not near-identities."""
    return random_timm_model(NAME, batchnorm=random_batchnorm_statistics(0.2), img_size=size, **(kwargs or SMALL))


def images(size: int = 64, n: int = 2) -> torch.Tensor:
    return seeded_randn(n, 3, size, size, seed=1)


def _float(model: nn.Module) -> vitq.QuantizedModel:
    return vitq.prepare(model, QuantConfig(method="float"))


@torch.no_grad()
def test_batchnorm_folding_keeps_the_float_function():
    model = build()
    x = images()
    qmodel = _float(model)
    assert rel_diff(qmodel(x), model(x)) <= 1e-5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qmodel.model.modules())
    assert isinstance(qmodel.model.head.bn, nn.Identity)  # folded into head.linear, after it
    assert isinstance(qmodel.model.patch_embed.conv1.bn, nn.Identity)


@torch.no_grad()
@pytest.mark.parametrize("size", [
    160,  # 10×10 pixels in stage 0: padded to 14×14, four 7×7 windows
    224,  # 14×14: four windows, no padding; 7×7 and 4×4 in the later stages
])
def test_windowed_configs_keep_the_float_function_and_compose(size):
    model = build(size, depth=(1, 2, 1))  # M0's three stages
    x = images(size, n=1)
    qmodel = _float(model)
    out = qmodel(x)
    assert rel_diff(out, model(x)) <= 1e-5
    staged = x
    for stage in qmodel.stages():
        staged = stage.run(staged)
    assert torch.equal(staged, out)


@torch.no_grad()
def test_cascaded_group_attention_computes_timms_output_and_its_points_see_each_head():
    """Each head's softmax point sees that head's probabilities (bias included) as [B, 1, N, N], its v point the
    head's values as [B, 1, N, val_dim]; the cascade feeds each head the previous head's output."""
    attn = build().stages[0].blocks[0].mixer.m.attn
    wrapped = QuantCascadedGroupAttention(copy.deepcopy(attn))
    B, N = 2, attn.resolution ** 2
    x = seeded_randn(B, 64, attn.resolution, attn.resolution, seed=3)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for i, head in enumerate(wrapped.heads):
        for point in ("q", "k", "v", "softmax", "context"):
            getattr(head, point).register_forward_hook(
                lambda m, a, out, key=(i, point): seen.__setitem__(key, out))
    assert rel_diff(wrapped(x), attn(x)) <= 1e-5
    bias = attn.attention_biases[:, attn.attention_bias_idxs]
    feat = x.chunk(attn.num_heads, dim=1)[0]
    for i in range(attn.num_heads):
        if i > 0:
            feat = feat + x.chunk(attn.num_heads, dim=1)[i]
        q, k, v = attn.qkvs[i](feat).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=1)
        q, k, v = attn.dws[i](q).flatten(2), k.flatten(2), v.flatten(2)
        probs = ((q * attn.scale).transpose(-2, -1) @ k + bias[i]).softmax(-1)
        assert seen[i, "softmax"].shape == (B, 1, N, N)
        assert torch.allclose(seen[i, "softmax"].sum(-1), torch.ones(()), atol=1e-6)
        assert torch.allclose(seen[i, "softmax"][:, 0], probs, atol=1e-6)
        assert torch.allclose(seen[i, "q"][:, 0], q.transpose(1, 2) * attn.scale, atol=1e-6)  # q·scale, as _attend
        assert torch.allclose(seen[i, "k"][:, 0], k.transpose(1, 2), atol=1e-6)
        assert torch.allclose(seen[i, "v"][:, 0], v.transpose(1, 2), atol=1e-6)
        out = v @ probs.transpose(-2, -1)  # timm's head output [B, val_dim, N]
        assert torch.allclose(seen[i, "context"][:, 0], out.transpose(1, 2), atol=1e-5)
        feat = out.view(B, attn.val_dim, attn.resolution, attn.resolution)


def test_roles_and_points():
    qmodel = _float(build())
    model = qmodel.model
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    roles = {slot.point: slot.role for slot in qmodel.slots() if slot.attr != "weight_quantizer"}
    assert roles["patch_embed.conv1.conv"] == "image"
    attn = "stages.0.blocks.0.mixer.m.attn"
    for point in ("patch_embed.conv2.conv", "stages.0.blocks.0.dw0.m.conv", "stages.0.blocks.0.ffn0.m.pw1.conv",
                  "stages.0.blocks.0.ffn0.m.pw2.conv", f"{attn}.qkvs.0.conv", f"{attn}.dws.3.conv",
                  f"{attn}.proj.1.conv", "stages.1.downsample.patchmerge.se.fc1",
                  "stages.1.downsample.patchmerge.se.fc2", "stages.1.downsample.patchmerge.conv2.conv", "head.linear"):
        assert roles[point] == "act", point
    for h in range(4):
        assert [roles[f"{attn}.heads.{h}.{p}"] for p in ("q", "k", "v", "softmax")] == \
            ["attn_q", "attn_k", "attn_v", "softmax"]
    assert isinstance(model.head.linear, QLinear)
    dws = model.get_submodule(f"{attn}.dws.0.conv")
    assert isinstance(dws, QConv2d) and dws.groups == dws.weight.shape[0] == 16
    assert qmodel.norm_linear_pairs() == []
    assert len(qmodel.attention_modules()) == 8 and all(isinstance(m, QuantCascadedHead)
                                                         for m in qmodel.attention_modules())


def test_state_dict_names():
    """timm's names, except that the BatchNorms are folded into their convolutions' biases (and the classifier's
    into ``head.linear``)."""
    timm_keys = set(build().state_dict())
    keys = set(_float(build()).model.state_dict())
    assert keys - timm_keys == {k.replace(".bn.running_mean", ".conv.bias") for k in timm_keys
                                if k.endswith(".bn.running_mean") and not k.startswith("head.")}
    assert {k for k in timm_keys - keys if ".bn." not in k} == set()


@torch.no_grad()
def test_classifier_batchnorm_fold():
    """The BatchNorm1d before the classifier is folded into the Linear after it."""
    model = build()
    qmodel = _float(model)
    pooled = seeded_randn(3, model.head.linear.in_features, seed=4)
    assert torch.allclose(qmodel.model.head(pooled), model.head(pooled), atol=1e-5)


def test_head_products_take_their_gradients_per_head():
    """ptq4vit / q-hyvit: each head's scores product (q·kᵀ) and context product (A·v, gradient at the head's
    ``context``: no proj reads one head)."""
    qmodel = vitq.prepare(build(), QuantConfig(method="ptq4vit", w_bits=8, a_bits=8))
    stages = qmodel.stages()
    index = next(i for i, s in enumerate(stages) if s.name == "stages.0.blocks.0")
    x = images()
    with torch.no_grad(), qmodel.quantization_disabled():
        target = qmodel(x).softmax(-1)
        for stage in stages[:index]:
            x = stage.run(x)
    products = [p for p in stage_products(qmodel, stages[index], row_stride=1)
                if isinstance(p, ScoresProduct | ContextProduct)]
    attn = "stages.0.blocks.0.mixer.m.attn"
    assert [p.name for p in products] == [f"{attn}.heads.{h}.{kind}" for h in range(4)
                                          for kind in ("scores", "context")]
    with torch.no_grad(), calibrating(qmodel.stage_quantizers(stages[index])):
        stages[index].run(x)
    grads = task_gradients(qmodel, index, x, target, products)
    for product in products:
        n = 16  # a 4×4 window
        expected = (2, 1, n, n) if isinstance(product, ScoresProduct) else (2, 1, n, 16)
        assert grads[product.name].shape == expected, product.name
        assert grads[product.name].abs().sum() > 0


def test_adalog_fpcs_searches_every_head(monkeypatch):
    import vitq.methods.adalog.fpcs as fpcs

    calls = count_calls(monkeypatch, fpcs, ["fpcs_value", "fpcs_query_key"])
    model = build()
    x = images()
    qmodel = vitq.quantize(model, QuantConfig(method="adalog", calib_size=2, options={"fpcs": True}), x,
                           model_name=NAME, progress=False)
    assert calls == {"fpcs_value": 8, "fpcs_query_key": 8}
    with torch.no_grad():
        assert torch.isfinite(qmodel(x)).all()
