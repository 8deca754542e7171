"""Tests of outlier splitting (vitq.nn.outliers): the two-part product, the channel choice, config and files."""

import pytest
import torch
from helpers import random_images
from torch import nn

import vitq
from vitq.calib.runner import calibrating
from vitq.config import OutlierConfig, QuantConfig
from vitq.errors import VitqError
from vitq.eval.size import model_size
from vitq.nn import QLinear
from vitq.nn.outliers import OUTLIER_BITS, ChannelSplit, extra_bits
from vitq.quantizers import build_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _split_linear(top_k: int, bits: int = 4) -> tuple[QLinear, torch.Tensor]:
    torch.manual_seed(0)
    layer = QLinear(nn.Linear(12, 5), "post_ln")
    layer.input_quantizer = build_quantizer({"kind": "uniform", "bits": bits, "granularity": "tensor"})
    layer.weight_quantizer = build_quantizer({"kind": "uniform", "bits": bits, "granularity": "channel", "axis": 0})
    layer.outlier_split = ChannelSplit(12, top_k=top_k)
    x = torch.randn(3, 7, 12)
    x[..., [2, 9]] *= 40.0  # two outlier channels
    with calibrating([layer.input_quantizer, layer.weight_quantizer]):
        layer(x)
    return layer, x


def test_top_k_and_threshold_choose_the_widest_channels():
    _, x = _split_linear(2)
    split = ChannelSplit(12, top_k=2)
    split.select(x)
    assert split.mask.nonzero().flatten().tolist() == [2, 9] and split.count == 2
    by_threshold = ChannelSplit(12, threshold=float(x[..., [0, 1, 3, 4, 5, 6, 7, 8, 10, 11]].abs().max()))
    by_threshold.select(x)
    assert by_threshold.mask.nonzero().flatten().tolist() == [2, 9]
    with pytest.raises(VitqError, match="exactly one"):
        ChannelSplit(12)


def test_split_linear_is_the_two_part_matmul():
    layer, x = _split_linear(2)
    outliers, rest = [2, 9], [c for c in range(12) if c not in (2, 9)]
    with torch.no_grad():
        got = layer(x)
        keep = torch.ones(12)
        keep[outliers] = 0.0
        x_codes, w_codes = layer.input_quantizer(x * keep), layer.weight_quantizer(layer.weight * keep)
        assert bool((x_codes[..., outliers] == 0).all()) and bool((w_codes[:, outliers] == 0).all())
        # the quantized product over the other channels plus the float product over the outliers, by index
        expected = x_codes[..., rest] @ w_codes[:, rest].T + x[..., outliers] @ layer.weight[:, outliers].T \
            + layer.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the quantizer's range no longer reaches the outliers
    assert float(layer.input_quantizer.scale) * 15 < float(x[..., outliers].abs().max()) / 4


def test_extra_bits_counts_the_float_channels():
    layer, _ = _split_linear(3, bits=4)
    assert extra_bits(layer.outlier_split, 4) == pytest.approx(3 * (OUTLIER_BITS - 4) / 12)


@pytest.fixture(scope="module")
def split_models(float_model):
    images = random_images(6)
    plain = vitq.quantize(float_model, QuantConfig(method="percentile", w_bits=4, a_bits=4, calib_size=3),
                          images[:3], progress=False)
    split = vitq.quantize(float_model, QuantConfig(method="percentile", w_bits=4, a_bits=4, calib_size=3,
                                                   outliers=OutlierConfig(top_k=2)), images[:3], progress=False)
    return plain, split, images


def test_outliers_split_the_post_layernorm_linears_and_count_in_the_size(split_models, float_model):
    plain, split, _ = split_models
    layers = {name: m for name, m in split.model.named_modules() if getattr(m, "outlier_split", None) is not None}
    assert sorted(layers) == sorted(f"blocks.{i}.{p}" for i in range(len(float_model.blocks))
                                    for p in ("attn.qkv", "mlp.fc1"))
    extra = sum(m.outlier_split.count * m.weight.shape[0] * (OUTLIER_BITS - 4) for m in layers.values()) // 8
    assert model_size(split).quantized_bytes - model_size(plain).quantized_bytes == pytest.approx(extra, abs=24)


def test_split_model_saves_and_loads_bit_identical(split_models, tmp_path):
    _, split, images = split_models
    vitq.save(split, tmp_path / "split.safetensors")
    loaded = vitq.load(tmp_path / "split.safetensors")
    assert loaded.config.outliers == OutlierConfig(top_k=2)
    with torch.no_grad():
        assert torch.equal(loaded(images), split(images))
    for name, module in split.model.named_modules():
        if getattr(module, "outlier_split", None) is not None:
            assert torch.equal(loaded.model.get_submodule(name).outlier_split.mask, module.outlier_split.mask)


def test_outlier_config_parses_and_refuses(float_model):
    assert OutlierConfig.parse("top_k=4") == OutlierConfig(top_k=4)
    assert OutlierConfig.parse("threshold=6,roles=post_ln+post_gelu") == \
        OutlierConfig(threshold=6.0, roles=("post_ln", "post_gelu"))
    for text, match in [("top_k=0", "top_k"), ("k=4", "must look like"), ("top_k=2,threshold=6", "exactly one"),
                        ("threshold=-1", "threshold")]:
        with pytest.raises(VitqError, match=match):
            OutlierConfig.parse(text)
    with pytest.raises(VitqError, match="'gptq' does not take outlier splitting"):
        vitq.prepare(float_model, QuantConfig(method="gptq", outliers=OutlierConfig(top_k=2)))
    with pytest.raises(VitqError, match="no quantized Linear input has a role of attn_q"):
        vitq.prepare(float_model, QuantConfig(method="minmax", outliers=OutlierConfig(top_k=2, roles=("attn_q",))))
