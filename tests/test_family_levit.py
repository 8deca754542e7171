"""LeViT specifics beyond the shared family checks (tests/test_families.py): BatchNorm folding (into the Linear before
it, and into the classifier after it), the roles of the points, the attention bias and scale order, the attention
with subsampling, the Hardswish before proj, the stages, the tensor names and the conv-mode refusal."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import random_batchnorm_statistics, random_timm_model, rel_diff, run_stages, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.errors import VitqError
from vitq.models.base import fold_batchnorm, fold_batchnorm_into_next_linear
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantLevitAttention, QuantLevitAttentionDownsample

NAME = "levit_128s"
SMALL = {"img_size": 128, "depth": (2, 1, 1), "num_classes": 10}


def build(name: str = NAME, **kwargs) -> nn.Module:
    """A small random LeViT (seed 0), parameters nudged and random BatchNorm statistics and gains, so that the
    zero-initialised attention biases, the zero-initialised residual-branch BatchNorm gains and the folds are not
    trivial."""
    return random_timm_model(name, batchnorm=random_batchnorm_statistics(0.5, gains=True), **{**SMALL, **kwargs})


def images(n: int = 2, size: int = 128) -> torch.Tensor:
    return seeded_randn(n, 3, size, size, seed=1)


def tokens(n: int = 2, count: int = 64, dim: int = 128) -> torch.Tensor:
    return seeded_randn(n, count, dim, seed=2)


@torch.no_grad()
def test_folds_are_timms_fuse():
    """fold_batchnorm on a LinearNorm and a ConvNorm, and the fold of the classifier's leading BatchNorm into its
    Linear, give what timm's own fuse() builds."""
    model = build()
    for path, kind in (("stages.0.blocks.0.attn.qkv", "linear"), ("stem.conv1", "linear"), ("head", "norm_linear")):
        module = model.get_submodule(path)
        fused = module.fuse()
        if kind == "linear":
            fold_batchnorm(model, f"{path}.linear", f"{path}.bn")
        else:
            fold_batchnorm_into_next_linear(model, f"{path}.bn", f"{path}.linear")
        assert isinstance(module.bn, nn.Identity)
        assert torch.allclose(module.linear.weight, fused.weight, atol=1e-6)
        assert torch.allclose(module.linear.bias, fused.bias, atol=1e-5)


@torch.no_grad()
def test_wrap_folds_every_batchnorm_and_keeps_the_function():
    model = build()
    x = images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qmodel.model.modules())
    assert rel_diff(qmodel(x), model(x)) <= 1e-5


@torch.no_grad()
def test_single_head_model():
    """A non-distilled LeViT (one classifier): same function, stages compose."""
    model = build(distilled=False)
    assert not hasattr(model, "head_dist")
    x = images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    out = run_stages(qmodel, x)
    assert torch.equal(out, qmodel(x))
    assert rel_diff(out, model(x)) <= 1e-5


def test_points_and_roles():
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    roles = {slot.name: slot.role for slot in qmodel.slots()}
    plain = [name for name, m in qmodel.model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert not plain  # every conv and Linear is a quantization point
    weights = [name for name, m in qmodel.model.named_modules() if isinstance(m, QLinear | QConv2d)]
    assert len(weights) == 4 + 4 * 4 + 2 * 5 + 2  # stem, 4 blocks, 2 attentions with subsampling, 2 classifiers
    assert roles["stem.conv1.linear.input_quantizer"] == "image"
    assert all(roles[f"{name}.input_quantizer"] == "act" for name in weights if name != "stem.conv1.linear")
    for attn in ("stages.0.blocks.1.attn", "stages.1.downsample.attn_downsample"):
        for point, role in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("softmax", "softmax")):
            assert roles[f"{attn}.{point}.quantizer"] == role
    assert qmodel.norm_linear_pairs() == []


@torch.no_grad()
@pytest.mark.parametrize("downsample", [False, True])
def test_attention_computes_timms_output_with_its_bias(downsample):
    model = build()
    if downsample:
        attn, wrapper, dim = model.stages[1].downsample.attn_downsample, QuantLevitAttentionDownsample, 128
    else:
        attn, wrapper, dim = model.stages[1].blocks[0].attn, QuantLevitAttention, 256
    count = 64 if downsample else 16
    wrapped = wrapper(copy.deepcopy(attn))
    x = tokens(count=count, dim=dim)
    assert rel_diff(wrapped(x), attn(x)) <= 1e-5
    wrapped.attention_biases.add_(torch.randn(wrapped.attention_biases.shape))
    assert rel_diff(wrapped(x), attn(x)) > 1e-3  # the bias takes part


@pytest.fixture(scope="module")
def minmax_w8a8():
    return vitq.quantize(build(), QuantConfig(method="minmax", w_bits=8, a_bits=8, calib_size=2), images(),
                         model_name=NAME, progress=False)


@torch.no_grad()
@pytest.mark.parametrize("path, n_q, n_k", [("stages.0.blocks.0.attn", 64, 64),
                                            ("stages.1.downsample.attn_downsample", 16, 64)])
def test_scaled_scores_and_bias_in_float(minmax_w8a8, path, n_q, n_k):
    """Under W8A8 the softmax input is Q(q) Q(k)ᵀ·scale + the gathered table, unquantized; with subsampling the
    queries are every second token of every second row of the grid."""
    qmodel = minmax_w8a8
    attn = qmodel.model.get_submodule(path)
    seen: dict[str, torch.Tensor] = {}
    handles = [attn.q.register_forward_hook(lambda m, a, out: seen.update(q=out)),
               attn.k.register_forward_hook(lambda m, a, out: seen.update(k=out)),
               attn.softmax.register_forward_pre_hook(lambda m, a: seen.update(probs=a[0]))]
    try:
        qmodel(images())
    finally:
        for handle in handles:
            handle.remove()
    assert seen["q"].shape == (2, attn.num_heads, n_q, 16) and seen["k"].shape == (2, attn.num_heads, n_k, 16)
    bias = attn.attention_biases[:, attn.attention_bias_idxs]
    assert bias.shape == (attn.num_heads, n_q, n_k)
    scores = seen["q"] @ seen["k"].transpose(-2, -1) * 16 ** -0.5 + bias
    assert torch.allclose(seen["probs"], scores.softmax(-1), atol=1e-6)
    assert not any("attention_bias" in point for point in qmodel.points())


@torch.no_grad()
def test_hardswish_before_proj():
    """proj reads the attention output with the heads merged; its Hardswish stays float and feeds the quantized
    Linear."""
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    attn = qmodel.model.get_submodule("stages.1.downsample.attn_downsample")
    assert isinstance(attn.proj.act, nn.Hardswish) and isinstance(attn.proj.ln.linear, QLinear)
    seen: dict[str, torch.Tensor] = {}
    handles = [attn.proj.register_forward_pre_hook(lambda m, a: seen.update(context=a[0])),
               attn.proj.ln.linear.register_forward_pre_hook(lambda m, a: seen.update(linear=a[0]))]
    try:
        qmodel(images())
    finally:
        for handle in handles:
            handle.remove()
    assert seen["context"].shape == (2, 16, attn.num_heads * attn.val_dim)
    assert torch.equal(seen["linear"], nn.functional.hardswish(seen["context"]))


def test_stage_names():
    qmodel = vitq.prepare(build(), QuantConfig(method="float"))
    assert [s.name for s in qmodel.stages()] == [
        "stem", "stages.0.blocks.0", "stages.0.blocks.1", "stages.1.downsample", "stages.1.blocks.0",
        "stages.2.downsample", "stages.2.blocks.0", "head"]


def test_tensor_names():
    """Folding removes the bn tensors and gives each folded layer a bias; the subsampling attention's query module is
    renamed q_proj; every other timm tensor keeps its name."""
    model = build()
    qmodel = vitq.prepare(model, QuantConfig(method="minmax", w_bits=8, a_bits=8))
    keys = {k for k in qmodel.model.state_dict() if "quantizer" not in k}
    timm_keys = set(model.state_dict())
    renamed = {k for k in timm_keys if ".attn_downsample.q." in k and ".bn." not in k}
    assert renamed == {f"stages.{i}.downsample.attn_downsample.q.ln.linear.weight" for i in (1, 2)}
    assert all(".bn." in k for k in timm_keys - keys - renamed)
    assert {k.replace(".q.", ".q_proj.") for k in renamed} <= keys
    assert all(k.endswith(".linear.bias") for k in keys - timm_keys if ".q_proj." not in k)
    assert "stages.0.blocks.0.attn.attention_biases" in keys


def test_conv_mode_is_refused_in_one_line():
    model = timm.create_model("levit_conv_128s", pretrained=False, img_size=128, depth=(1, 1, 1), num_classes=10)
    with pytest.raises(VitqError) as err:
        vitq.prepare(model, QuantConfig(method="float"))
    assert "conv mode" in str(err.value) and "\n" not in str(err.value)
