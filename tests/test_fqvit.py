"""Tests of FQ-ViT: the Power-of-Two Factor quantizer (against a plain loop) and the ``fqvit`` method."""

import pytest
import torch
from helpers import quantized_test_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq
from vitq.errors import VitqError
from vitq.quantizers import build_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _residual_like(seed: int, channels: int = 24, tokens: int = 50) -> torch.Tensor:
    """Channels whose ranges differ by up to ~30x, as LayerNorm inputs do."""
    generator = torch.Generator().manual_seed(seed)
    spread = torch.exp(torch.rand(channels, generator=generator) * 3.5)
    return torch.randn(tokens, channels, generator=generator) * spread + torch.randn(channels, generator=generator)


def _reference_ptf(x: torch.Tensor, bits: int, max_factor: int) -> tuple[torch.Tensor, float]:
    """FQ-ViT's PTF written as a loop over channels and factors."""
    q_max = 2**bits - 1
    low, high = x.min().item(), x.max().item()
    full_step = (high - low) / q_max
    zero = min(max(-round(low / full_step), 0), q_max)
    scales = []
    for c in range(x.shape[-1]):
        column = x[:, c].double()
        best = None
        for alpha in range(max_factor + 1):
            step = full_step / 2**max_factor * 2**alpha
            q = (torch.round(column / step) + zero).clamp(0, q_max)
            error = ((q - zero) * step - column).pow(2).sum().item()
            if best is None or error < best[0] - 1e-12 * abs(best[0]):
                best = (error, step)
        scales.append(best[1])
    return torch.tensor(scales), zero


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([4, 6, 8]))
def test_ptf_matches_a_plain_loop(seed, bits):
    x = _residual_like(seed)
    quantizer = build_quantizer({"kind": "ptf", "bits": bits})
    quantizer.calibrate(x)
    scales, zero = _reference_ptf(x, bits, 3)
    torch.testing.assert_close(quantizer.scale.double(), scales.double(), rtol=1e-5, atol=0)
    assert torch.all(quantizer.zero_point == zero)
    ratios = torch.log2(quantizer.scale / quantizer.scale.min())
    assert torch.allclose(ratios, ratios.round(), atol=1e-5) and ratios.max() <= 3  # powers of two, 0..3
    codes = quantizer.int_repr(x)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(quantizer.int_repr(quantizer(x)), codes)  # idempotent


def test_ptf_never_worse_than_the_shared_min_max_step_per_channel():
    x = _residual_like(3)
    ptf = build_quantizer({"kind": "ptf", "bits": 6})
    ptf.calibrate(x)
    plain = build_quantizer({"kind": "uniform", "bits": 6, "init": "minmax"})
    plain.calibrate(x)
    assert torch.all((ptf(x) - x).square().sum(0) <= (plain(x) - x).square().sum(0) * (1 + 1e-6))
    assert (ptf(x) - x).square().sum() < 0.5 * (plain(x) - x).square().sum()  # narrow channels gain a lot


def test_ptf_rebuilds_from_its_spec():
    quantizer = build_quantizer({"kind": "ptf", "bits": 8, "max_factor": 2})
    assert build_quantizer(quantizer.spec()).spec() == quantizer.spec()
    with pytest.raises(VitqError, match="max_factor"):
        build_quantizer({"kind": "ptf", "bits": 8, "max_factor": -1})


def test_fqvit_method_structure_and_round_trip(tmp_path):
    model, images, qmodel = quantized_test_vit("fqvit", 8, 8)
    specs = qmodel.quant_specs()
    assert specs["blocks.0.norm1.input_quantizer"]["kind"] == "ptf"
    assert specs["norm.input_quantizer"]["kind"] == "ptf"
    assert specs["blocks.0.attn.softmax.quantizer"] == {"kind": "log2", "bits": 4, "search_percentiles": [],
                                                       "fixed_scales": [1.0]}
    assert specs["blocks.0.mlp.fc1.weight_quantizer"]["symmetric"] is True
    assert float(qmodel.model.blocks[0].attn.softmax.quantizer.scale) == 1.0
    path = vitq.save(qmodel, tmp_path / "fq.safetensors")
    with torch.no_grad():
        assert torch.equal(vitq.load(path)(images), qmodel(images))
    with pytest.raises(VitqError, match="softmax_bits"):
        vitq.prepare(model, vitq.QuantConfig(method="fqvit", options={"softmax_bits": 1}))


def test_fqvit_calibrates_the_layernorm_before_the_blocks_of_a_pre_norm_model():
    """CLIP-style towers have a LayerNorm (``norm_pre``) between the embedding and the blocks: its PTF input
    quantizer belongs to the embedding stage, so forward-order calibration reaches it."""
    import timm
    from helpers import random_images

    model = timm.create_model("test_vit", pre_norm=True).eval()
    images = random_images(4)
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="fqvit", calib_size=4), images, progress=False)
    norm_pre = qmodel.model.norm_pre.input_quantizer
    assert norm_pre is not None and norm_pre.is_calibrated
    with torch.no_grad():
        quantized = qmodel(images)
        with qmodel.quantization_disabled():
            reference = qmodel(images)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, reference)


def test_fqvit_calibrates_the_layernorm_of_an_attention_pooling_head():
    """SigLIP-style towers pool with a multi-head attention probe (``attn_pool``) whose MLP starts with a LayerNorm:
    it belongs to the head stage, so its PTF input quantizer is calibrated and the model runs."""
    import timm
    from helpers import random_images

    model = timm.create_model("test_vit", class_token=False, global_pool="map").eval()
    images = random_images(4)
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="fqvit", calib_size=4), images, progress=False)
    norm = qmodel.model.attn_pool.norm.input_quantizer
    assert norm is not None and norm.is_calibrated
    with torch.no_grad():
        assert torch.isfinite(qmodel(images)).all()
