"""MobileViT v1 / v2 specifics beyond the shared family checks (tests/test_families.py): BatchNorm folding with real
running statistics, the full configs (a last stage of one patch, feature maps that are interpolated to a multiple
of the patch size, squeeze-excitation), what v2's separable-attention points see and feed, the searches that
use them, roles, fold pairs and tensor names."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import timm
import torch
from helpers import count_calls, random_batchnorm_statistics, random_timm_model, rel_diff, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.errors import VitqError
from vitq.methods.ptq4vit.products import ContextProduct, stage_products, task_gradients
from vitq.models import adapter_for
from vitq.models.timm_mobilevit import MobileVitAdapter
from vitq.nn import QConv2d, QLinear, QuantAttention
from vitq.nn.attention import QuantLinearSelfAttention

V1, V2 = "mobilevit_xxs", "mobilevitv2_050"


def build(name: str, stages: int | None = 3, **kwargs) -> nn.Module:
    """A random MobileViT (seed 0) with its first ``stages`` stages (all: ``None``), parameters nudged and random
    BatchNorm statistics, so that the folds are not near-identities."""
    if stages is not None:
        kwargs["blocks"] = timm.models.mobilevit.model_cfgs[name].blocks[:stages]
    if not timm.is_model(name):  # a config of timm's MobileViT module without a registered model
        from timm.models.byobnet import ByobNet

        name = partial(ByobNet, timm.models.mobilevit.model_cfgs[name])
    return random_timm_model(name, batchnorm=random_batchnorm_statistics(0.2), **kwargs)


def images(size: int = 64, n: int = 2) -> torch.Tensor:
    return seeded_randn(n, 3, size, size, seed=1)


def _float(model: nn.Module) -> vitq.QuantizedModel:
    return vitq.prepare(model, QuantConfig(method="float"))


@torch.no_grad()
@pytest.mark.parametrize("name", [V1, V2])
def test_batchnorm_folding_keeps_the_float_function(name):
    """Non-trivial running statistics: the folded convolutions compute what conv → BatchNorm computed, and no
    BatchNorm is left."""
    model = build(name)
    x = images()
    qmodel = _float(model)
    assert rel_diff(qmodel(x), model(x)) <= 1e-5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qmodel.model.modules())
    assert isinstance(qmodel.model.stem.bn, nn.Sequential)  # BatchNormAct2d → its (dropout and) SiLU
    assert isinstance(qmodel.model.stem.bn[-1], nn.SiLU)
    assert isinstance(qmodel.model.stages[0][0].conv3_1x1.bn, nn.Sequential)  # linear output: no activation
    assert not any(isinstance(m, nn.SiLU) for m in qmodel.model.stages[0][0].conv3_1x1.bn)


@torch.no_grad()
@pytest.mark.parametrize("name, size", [
    (V1, 64),  # the last MobileViT block sees 2×2 pixels: one patch, attention over a single token
    (V2, 64),
    (V1, 72),  # 9×9 and 5×5 feature maps: interpolated to a multiple of the patch size and back
    (V2, 72),
])
def test_full_configs_keep_the_float_function_and_compose(name, size):
    model = build(name, stages=None)
    x = images(size, n=1)
    qmodel = _float(model)
    out = qmodel(x)
    assert rel_diff(out, model(x)) <= 1e-5
    staged = x
    for stage in qmodel.stages():
        staged = stage.run(staged)
    assert torch.equal(staged, out)


@torch.no_grad()
def test_squeeze_excitation_convs_are_points():
    """timm's ``semobilevit_s`` config: the SE modules of the inverted residuals are quantized (both 1×1 convs read
    activations)."""
    model = build("semobilevit_s")
    qmodel = vitq.prepare(model, QuantConfig(method="float"), model_name="mobilevit_s")  # no timm name of its own
    x = images()
    assert rel_diff(qmodel(x), model(x)) <= 1e-5
    se = qmodel.model.stages[0][0].attn
    assert isinstance(se.fc1, QConv2d) and isinstance(se.fc2, QConv2d)
    assert se.fc1.slot_roles["input_quantizer"] == "act"


def test_plain_byobnet_cnns_do_not_match():
    from timm.models.byobnet import ByobNet

    cnn = timm.create_model("gernet_s", pretrained=False)
    assert isinstance(cnn, ByobNet) and not MobileVitAdapter.matches(cnn)
    assert adapter_for(build(V1)) is MobileVitAdapter and adapter_for(build(V2)) is MobileVitAdapter
    with pytest.raises(VitqError, match="no vitq adapter"):
        vitq.prepare(cnn, QuantConfig(method="float"))


def test_roles():
    roles = {}
    for name in (V1, V2):
        for slot in _float(build(name)).slots():
            if slot.attr == "input_quantizer" or slot.role not in ("weight", "pre_ln"):
                roles[name, slot.point] = slot.role
    assert roles[V1, "stem.conv"] == roles[V2, "stem.conv"] == "image"
    block = "stages.2.1"
    for point in (".transformer.0.attn.qkv", ".transformer.1.mlp.fc1"):
        assert roles[V1, block + point] == "post_ln"
    for point in (".transformer.0.mlp.fc2", ".transformer.0.attn.proj", ".conv_proj.conv", ".conv_fusion.conv",
                  ".conv_kxk.conv", ".conv_1x1"):
        assert roles[V1, block + point] == "act", point  # fc2 after SiLU, conv_proj channels first
    for point in (".transformer.0.attn.qkv_proj", ".transformer.0.attn.out_proj", ".transformer.0.mlp.fc1",
                  ".transformer.0.mlp.fc2", ".conv_proj.conv"):
        assert roles[V2, block + point] == "act", point  # GroupNorm1 outputs are not post-LayerNorm
    assert roles[V2, block + ".transformer.0.attn.v"] == "attn_v"
    assert roles[V2, block + ".transformer.0.attn.softmax"] == "softmax"
    for name in (V1, V2):
        assert roles[name, "head.fc"] == "act"
        assert roles[name, "stages.1.0.conv2_kxk.conv"] == "act"


def test_every_conv_and_linear_is_a_point_and_depthwise_convs_keep_their_groups():
    for name in (V1, V2):
        model = _float(build(name)).model
        assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
        dw = model.stages[1][0].conv2_kxk.conv
        assert isinstance(dw, QConv2d) and dw.groups == dw.weight.shape[0] > 1
        assert isinstance(model.stages[2][1].transformer[0].attn, QuantAttention if name == V1
                          else QuantLinearSelfAttention)
        assert isinstance(model.head.fc, QLinear)


def test_fold_pairs_are_the_v1_transformer_norms():
    pairs = _float(build(V1)).norm_linear_pairs()
    assert pairs == [(f"stages.2.1.transformer.{k}.{norm}", f"stages.2.1.transformer.{k}.{linear}")
                     for k in range(2) for norm, linear in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))]
    assert _float(build(V2)).norm_linear_pairs() == []


def test_state_dict_names():
    """timm's names, except that the BatchNorms are folded into biases of their convolutions."""
    timm_keys = set(build(V1).state_dict())
    keys = set(_float(build(V1)).model.state_dict())
    quantizers = {k for k in keys if "quantizer" in k}
    assert not quantizers  # float: no quantizer buffers
    assert "stem.conv.bias" in keys and "stem.bn.weight" not in keys
    assert keys - timm_keys == {k.replace(".bn.running_mean", ".conv.bias") for k in timm_keys
                                if k.endswith(".bn.running_mean")}
    assert {k for k in timm_keys - keys if ".bn." not in k} == set()


def _linear_self_attention() -> nn.Module:
    return build(V2).stages[2][1].transformer[0].attn


@torch.no_grad()
def test_linear_self_attention_computes_timms_output_and_its_points_see_probabilities_and_keys():
    attn = _linear_self_attention()
    wrapped = QuantLinearSelfAttention(copy.deepcopy(attn))
    x = seeded_randn(2, attn.embed_dim, 4, 16, seed=3)  # [B, dim, P, N]
    seen = {}
    for point in ("v", "softmax", "context"):
        getattr(wrapped, point).register_forward_hook(lambda m, a, out, key=point: seen.__setitem__(key, out))
    assert rel_diff(wrapped(x), attn(x)) <= 1e-5
    query, key, _ = attn.qkv_proj(x).split([1, attn.embed_dim, attn.embed_dim], dim=1)
    assert seen["softmax"].shape == (2, 4, 1, 16)  # [B, P (the "heads"), one query, N]
    assert torch.allclose(seen["softmax"].sum(-1), torch.ones(()), atol=1e-6)
    assert torch.allclose(seen["softmax"], query.softmax(-1).permute(0, 2, 1, 3), atol=1e-6)
    assert torch.allclose(seen["v"], key.permute(0, 2, 3, 1), atol=1e-6)  # timm's key: [B, P, N, dim]
    assert torch.allclose(seen["context"], seen["softmax"] @ seen["v"], atol=1e-6)
    with pytest.raises(NotImplementedError):
        wrapped(x, x)


def test_context_product_gradient_is_the_context_vectors():
    """ptq4vit / q-hyvit: v2's context product O = A·key takes its gradient at ``attn.context`` ([B, P, 1, dim],
    the shape of O), not at ``out_proj``'s input."""
    qmodel = vitq.prepare(build(V2), QuantConfig(method="ptq4vit", w_bits=8, a_bits=8))
    stages = qmodel.stages()
    index = next(i for i, s in enumerate(stages) if s.name == "stages.2.1")
    x = images()
    with torch.no_grad(), qmodel.quantization_disabled():
        target = qmodel(x).softmax(-1)
        for stage in stages[:index]:
            x = stage.run(x)
    products = [p for p in stage_products(qmodel, stages[index], row_stride=1) if isinstance(p, ContextProduct)]
    assert [p.name for p in products] == [f"stages.2.1.transformer.{k}.attn.context" for k in range(2)]
    from vitq.calib.runner import calibrating

    with torch.no_grad(), calibrating(qmodel.stage_quantizers(stages[index])):
        stages[index].run(x)
    grads = task_gradients(qmodel, index, x, target, products)
    for product in products:
        attn = product.attn
        assert grads[product.name].shape == (2, 4, 1, attn.embed_dim)
        assert grads[product.name].abs().sum() > 0


def test_adalog_fpcs_searches_the_separable_attention(monkeypatch):
    """FPCS searches v by the context error, once per attention; there is no q·kᵀ product to search."""
    import vitq.methods.adalog.fpcs as fpcs

    calls = count_calls(monkeypatch, fpcs, ["fpcs_value", "fpcs_query_key"])
    model = build(V2)
    x = images()
    qmodel = vitq.quantize(model, QuantConfig(method="adalog", calib_size=2, options={"fpcs": True}), x,
                           model_name=V2, progress=False)
    assert calls == {"fpcs_value": 2, "fpcs_query_key": 0}
    with torch.no_grad():
        assert torch.isfinite(qmodel(x)).all()
