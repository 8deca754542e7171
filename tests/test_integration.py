"""End-to-end checks on the real DeiT-tiny weights and ImageNet images (../shared/assets).

Float must reproduce plain timm, and every method at W8A8 must stay within 1 top-1 point of float on
the 968 evaluation images (seed 0): a W8A8 result far from float means a bug, not a method limit.
"""

from __future__ import annotations

import pytest
import torch

import vitq

pytestmark = pytest.mark.integration


def test_timm_reference_accuracy_on_all_1000_images(float_result_all):
    """Our data pipeline reproduces the assets README: 796/1000 top-1 for DeiT-tiny FP32."""
    result = float_result_all
    assert result.n_images == 1000
    assert int(result.correct.sum()) == 796
    assert result.top5 == pytest.approx(94.6, abs=0.05)


@torch.no_grad()
def test_float_method_gives_plain_timm_logits(deit_tiny, split_seed0):
    """The ``float`` method computes plain timm's logits and classes (first 256 evaluation images), up to float32
    rounding: its attention is explicit (softmax quantizers need the probabilities), timm's is fused."""
    images = split_seed0[1][0][:256]
    wrapped = vitq.prepare(deit_tiny, vitq.QuantConfig(method="float"))(images)
    plain = deit_tiny(images)
    assert torch.equal(wrapped.argmax(1), plain.argmax(1))
    torch.testing.assert_close(wrapped, plain, rtol=1e-4, atol=1e-4)


#: methods whose post-softmax quantizer is log√2: its step near probability 1 (1 -> 0.71) does not shrink with bits,
#: so their W8A8 drop is the quantizer's, measured 0.59 ± 0.24 (repq-vit) and 0.69 ± 0.53 (erq) over 3 seeds and
#: 1.14 for both on seed 0 on one x86 CPU (benchmarks/results/w8a8_softmax_check.md, the leaderboard)
LOG_SQRT2_SOFTMAX = {"repq-vit", "erq"}
UNIFORM_SOFTMAX = vitq.PointOverride.parse("blocks.*.attn.softmax=uniform:8")


@pytest.mark.parametrize("method", ["minmax", "percentile", "repq-vit", "dopq-vit", "gptq", "erq"])
def test_w8a8_within_one_point_of_float(method, deit_tiny, split_seed0, float_top1_seed0):
    """W8A8 is at float (within one point, ~10 of 968 images): a larger drop is a bug, not a method limit. The
    log√2 softmax methods are held to that with an 8-bit uniform softmax, and to 1.5 points with their own."""
    calib, eval_data = split_seed0
    float_top1 = float_top1_seed0
    overrides = [[]] + ([[UNIFORM_SOFTMAX]] if method in LOG_SQRT2_SOFTMAX else [])
    for override in overrides:
        config = vitq.QuantConfig(method=method, w_bits=8, a_bits=8, overrides=override)
        qmodel = vitq.quantize(deit_tiny, config, calib, progress=False)
        quant_top1 = vitq.evaluate(qmodel, eval_data, progress=False).top1
        bound = 1.5 if method in LOG_SQRT2_SOFTMAX and not override else 1.0
        assert abs(float_top1 - quant_top1) <= bound, (method, override, float_top1, quant_top1)


@pytest.fixture(scope="module")
def repq_w4a4_top1_seed0(deit_tiny, split_seed0) -> float:
    calib, eval_data = split_seed0
    qmodel = vitq.quantize(deit_tiny, vitq.QuantConfig(method="repq-vit", w_bits=4, a_bits=4), calib, progress=False)
    return vitq.evaluate(qmodel, eval_data, progress=False).top1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "erq"])
def test_weight_rounding_beats_plain_rounding_at_w4a4(method, deit_tiny, split_seed0, repq_w4a4_top1_seed0):
    """GPTQ and ERQ change only the weights of the RepQ-ViT model: at W4A4 both gain several points on the real
    model (seed 0: repq-vit 63.4 %, gptq 67.4 %, erq 66.3 % on the 968 images)."""
    calib, eval_data = split_seed0
    qmodel = vitq.quantize(deit_tiny, vitq.QuantConfig(method=method, w_bits=4, a_bits=4), calib, progress=False)
    top1 = vitq.evaluate(qmodel, eval_data, progress=False).top1
    assert top1 >= repq_w4a4_top1_seed0 + 1.0, (method, top1, repq_w4a4_top1_seed0)


def test_packed_w4_checkpoint_is_small_and_exact(deit_tiny, split_seed0, assets, tmp_path):
    from vitq.assets import DEIT_TINY_CHECKPOINT

    calib, (images, _) = split_seed0
    qmodel = vitq.quantize(deit_tiny, vitq.QuantConfig(method="minmax", w_bits=4, a_bits=8), calib, progress=False)
    path = vitq.save(qmodel, tmp_path / "w4.safetensors")
    ratio = path.stat().st_size / (assets / DEIT_TINY_CHECKPOINT).stat().st_size
    assert ratio <= 0.16, ratio
    with torch.no_grad():
        assert torch.equal(vitq.load(path)(images[:8]), qmodel(images[:8]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript ONNX exporter
def test_onnx_w8a8_export_runs_in_onnxruntime_like_fake_quant(deit_tiny, split_seed0, assets, tmp_path):
    """percentile W8A8 exports with every point as int8 QDQ; onnxruntime's integer kernels give the fake-quant
    classes on nearly every image (the rest are float32 rounding ties, as between float32 and float64 torch)."""
    from vitq.assets import DEIT_TINY_CHECKPOINT
    from vitq.eval.ort import OrtModel
    from vitq.export.onnx import export_onnx

    calib, (images, _) = split_seed0
    qmodel = vitq.quantize(deit_tiny, vitq.QuantConfig(method="percentile", w_bits=8, a_bits=8), calib,
                           progress=False)
    exported = export_onnx(qmodel, tmp_path / "w8a8.onnx")
    assert not exported.float_points
    assert exported.path.stat().st_size <= 0.3 * (assets / DEIT_TINY_CHECKPOINT).stat().st_size
    subset = images[:256]
    with torch.no_grad():
        reference = qmodel(subset)
    logits = OrtModel(exported.path, threads=2)(subset)
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.97
    assert (logits - reference).abs().mean() < 0.1


def test_deit_tiny_through_a_transformers_folder_gives_the_timm_numbers(deit_tiny, split_seed0, assets, tmp_path):
    """`vitq convert --to hf` then `hf:<folder>`: the same preprocessing, float logits and W8A8 logits (on the
    first 256 evaluation images)."""
    from PIL import Image

    from vitq.assets import IMAGENET_SAMPLE
    from vitq.data.transforms import transform_for_model
    from vitq.models.hf import write_hf_folder

    hf_model = vitq.create_model(f"hf:{write_hf_folder(deit_tiny, tmp_path / 'hf')}")
    images = sorted((assets / IMAGENET_SAMPLE).rglob("*.JPEG"))[:4]
    for path in images:  # the same pixels (DeiT-tiny resizes to 248 then crops 224)
        image = Image.open(path).convert("RGB")
        assert torch.equal(transform_for_model(hf_model)(image), transform_for_model(deit_tiny)(image))
    calib, eval_data = split_seed0
    with torch.no_grad():
        assert torch.equal(hf_model(calib[:8]), deit_tiny(calib[:8]))
    config = vitq.QuantConfig(method="percentile", w_bits=8, a_bits=8)
    with torch.no_grad():
        timm_logits, hf_logits = (vitq.quantize(model, config, calib, progress=False)(eval_data[0][:256])
                                  for model in (deit_tiny, hf_model))
    assert torch.equal(timm_logits.argmax(1), hf_logits.argmax(1))
    torch.testing.assert_close(hf_logits, timm_logits, rtol=1e-5, atol=1e-5)
