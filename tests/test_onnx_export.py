"""Tests of vitq.export.onnx (QDQ export) and vitq.eval.ort (onnxruntime runner) on timm's tiny ``test_vit``.

A quantization point exported as QDQ must compute exactly our fake-quant: checked point by point on a single
layer, where only float accumulation order differs. On a whole model, float32 differences between torch and
onnxruntime kernels (LayerNorm, Softmax, Erf, GEMM order) move a few values across rounding boundaries, and
each flipped code propagates; a whole model is therefore checked loosely: same classes, and a deviation far
below the quantization error itself (on DeiT-tiny the same happens between float32 and float64 torch).
"""


import numpy as np
import onnx
import pytest
import timm
import torch
from helpers import assert_close_to_fake_quant, random_images
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq
from vitq.calib.runner import calibrate_in_forward_order, calibrating
from vitq.errors import VitqError
from vitq.eval.ort import OrtModel
from vitq.export.onnx import INT8, UINT8, _qdq_params, _slot_export, export_onnx
from vitq.nn import QAct, QLinear
from vitq.quantized_model import Slot
from vitq.quantizers import build_quantizer

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # torch's TorchScript ONNX exporter
MODEL = "test_vit"  # 6 blocks, dim 64, 3 heads, 160 px


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return random_images(6)


def _quantize(float_model, images, method: str, w_bits: int, a_bits: int) -> vitq.QuantizedModel:
    config = vitq.QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, calib_size=3)
    return vitq.quantize(float_model, config, images[:3], progress=False)


def _ort_logits(path, images, optimization="all") -> torch.Tensor:
    return OrtModel(path, threads=1, optimization=optimization)(images)


def _torch_logits(qmodel, images) -> torch.Tensor:
    with torch.no_grad():
        return qmodel(images)


def _assert_close_to_fake_quant(qmodel, path, images, optimization="all") -> None:
    assert_close_to_fake_quant(qmodel, _ort_logits(path, images, optimization), images)


def _int8_constants(path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    arrays = [onnx.numpy_helper.to_array(a.t) for node in model.graph.node if node.op_type == "Constant"
              for a in node.attribute if a.name == "value"]
    return [a for a in arrays if a.dtype == np.int8 and a.ndim in (2, 4)]


def _export_layer(module: torch.nn.Module, x: torch.Tensor, path, signed_activations: bool = False) -> torch.Tensor:
    """Swap the layer's calibrated quantizers for their export shims, export it alone, run it in onnxruntime."""
    originals = {}
    for attr, role in module.slots().items():
        entry, shim = _slot_export(Slot("layer", attr, role, module), signed_activations)
        assert shim is not None, entry.reason
        originals[attr] = getattr(module, attr)
        setattr(module, attr, shim)
    try:
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17)
    finally:
        for attr, quantizer in originals.items():
            setattr(module, attr, quantizer)
    session = OrtModel(path, threads=1).session
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("w_spec, x_spec", [
    ({"bits": 8}, {"bits": 8}),
    ({"bits": 4, "signed": True, "symmetric": True}, {"bits": 4}),
    ({"bits": 3}, {"bits": 6}),
    ({"bits": 8, "signed": True}, {"bits": 5, "signed": True, "symmetric": True}),
])
@pytest.mark.parametrize("signed_activations", [False, True])  # signed codes stored as uint8 (offset) or int8
def test_linear_layer_export_equals_fake_quant(w_spec, x_spec, signed_activations, tmp_path):
    torch.manual_seed(0)
    layer = QLinear(torch.nn.Linear(48, 24), "act")
    layer.weight_quantizer = build_quantizer({"kind": "uniform", "granularity": "channel", "axis": 0, **w_spec})
    layer.input_quantizer = build_quantizer({"kind": "uniform", **x_spec})
    x = torch.randn(5, 7, 48) * torch.linspace(0.2, 3, 48) + 0.5
    layer.weight_quantizer.calibrate(layer.weight.detach())
    layer.input_quantizer.calibrate(x)
    with torch.no_grad():
        exported = _export_layer(layer, x, tmp_path / "linear.onnx", signed_activations)
        torch.testing.assert_close(exported, layer(x), atol=1e-5, rtol=1e-5)


def test_uniform_w4a4_export_forms_and_accuracy(float_model, images, tmp_path):
    qmodel = _quantize(float_model, images, "minmax", 4, 4)
    exported = export_onnx(qmodel, tmp_path / "w4a4.onnx")
    forms = {p.slot: p.form for p in exported.points}
    weights = [s for s in forms if s.endswith("weight_quantizer")]
    assert len(weights) == 6 * 4 + 2 and all(forms[s] == "int8 weight" for s in weights)
    assert forms["blocks.0.mlp.fc2.input_quantizer"] == "uint8 QDQ + clip"  # 4-bit codes in uint8: clipped first
    assert not exported.float_points
    for optimization in ("disable", "all"):
        _assert_close_to_fake_quant(qmodel, exported.path, images, optimization)


def test_integer_kernels_keep_the_classes_at_w8a8(float_model, images, tmp_path):
    """With every fusion on (MatMulIntegerToFloat, QLinearMatMul) the classes are those of fake-quant."""
    qmodel = _quantize(float_model, images, "percentile", 8, 8)
    path = export_onnx(qmodel, tmp_path / "w8a8.onnx").path
    fused, reference = _ort_logits(path, images), _torch_logits(qmodel, images)
    assert torch.equal(fused.argmax(1), reference.argmax(1))
    assert (fused - reference).abs().max() < 0.2 * reference.std()


def test_weights_are_stored_as_their_int8_codes(float_model, images, tmp_path):
    qmodel = _quantize(float_model, images, "minmax", 8, 8)
    path = export_onnx(qmodel, tmp_path / "w8.onnx").path
    stored = _int8_constants(path)
    qkv = qmodel.model.blocks[0].attn.qkv  # Linear: codes stored transposed, unsigned 8-bit codes moved by -128
    codes = (qkv.weight_quantizer.int_repr(qkv.weight) - 128).numpy().astype(np.int8)
    assert any(a.shape == codes.T.shape and np.array_equal(a, codes.T) for a in stored)
    conv = qmodel.model.patch_embed.proj  # Conv: stored as is
    codes = (conv.weight_quantizer.int_repr(conv.weight) - 128).numpy().astype(np.int8)
    assert any(a.shape == codes.shape and np.array_equal(a, codes) for a in stored)
    float_file = export_onnx(vitq.prepare(float_model, vitq.QuantConfig(method="float")), tmp_path / "f.onnx").path
    assert path.stat().st_size < 0.5 * float_file.stat().st_size  # tiny model: graph overhead; DeiT-tiny 0.28


def test_fractional_zero_points_stay_float_and_are_named(float_model, images, tmp_path):
    qmodel = _quantize(float_model, images, "repq-vit", 4, 4)
    exported = export_onnx(qmodel, tmp_path / "repq.onnx")
    reasons = {p.slot: p.reason for p in exported.float_points}
    # RepQ-ViT's reparameterized post-LayerNorm target keeps an unrounded zero point
    assert "fractional zero point" in reasons["blocks.0.attn.qkv.input_quantizer"]
    assert all(p.form == "int8 weight" for p in exported.points if p.role == "weight")
    # with a float input, the weight DQ → MatMul fuses into MatMulNBits: it must stay float32 (accuracy level 1)
    _assert_close_to_fake_quant(qmodel, exported.path, images)


@pytest.mark.parametrize("spec", [{"kind": "log2", "bits": 4}, {"kind": "log_sqrt2", "bits": 8},
                                  {"kind": "tanq", "bits": 6}, {"kind": "twin_uniform_softmax", "bits": 8}])
def test_softmax_codes_and_level_lookup_equal_fake_quant(spec, tmp_path):
    torch.manual_seed(0)
    point = QAct("softmax")
    point.quantizer = build_quantizer(spec)
    p = torch.softmax(torch.randn(2, 3, 17, 17) * 3, dim=-1)
    p[0, 0, 0] = torch.tensor([0.0, 1e-30, 1e-8] + [1 / 14] * 14)  # exact zero and underflowing probabilities
    with calibrating([point.quantizer]):
        point.quantizer(p)
    entry, _ = _slot_export(Slot("softmax", "quantizer", "softmax", point), False)
    wide = spec["kind"].startswith("log") and spec["bits"] == 8  # 2^8 non-zero levels and an exact zero
    assert entry.form == ("int16" if wide else "uint8") + " codes + level lookup"
    with torch.no_grad():
        exported = _export_layer(point, p, tmp_path / "softmax.onnx")
        reference = point.quantizer(p)
    assert torch.equal(exported, reference)


@pytest.mark.parametrize("method", ["repq-vit", "dopq-vit"])
def test_reparameterized_methods_export_with_no_float_path_for_onnxruntime(float_model, images, method, tmp_path):
    config = vitq.QuantConfig(method=method, w_bits=8, a_bits=8, calib_size=3, deploy="onnxruntime")
    qmodel = vitq.quantize(float_model, config, images[:3], progress=False)
    exported = export_onnx(qmodel, tmp_path / f"{method}.onnx")
    assert not exported.float_points
    softmax = {p.form for p in exported.points if p.role == "softmax"}
    assert softmax == {("int16" if method == "repq-vit" else "uint8") + " codes + level lookup"}
    _assert_close_to_fake_quant(qmodel, exported.path, images)


def test_per_head_and_per_channel_activations_take_the_float_path(float_model, images, tmp_path):
    qmodel = vitq.prepare(float_model, vitq.QuantConfig(method="minmax", w_bits=6, a_bits=6))
    attn = qmodel.model.blocks[0].attn
    attn.q.quantizer = build_quantizer({"kind": "uniform", "bits": 6, "granularity": "head", "axis": 1,
                                        "groups": attn.num_heads})
    qmodel.model.blocks[0].mlp.fc1.input_quantizer = build_quantizer(
        {"kind": "uniform", "bits": 6, "granularity": "channel", "axis": -1})
    calibrate_in_forward_order(qmodel, images[:3], progress=False)
    exported = export_onnx(qmodel, tmp_path / "axes.onnx")
    reasons = {p.slot: p.reason for p in exported.float_points}
    assert "per-head" in reasons["blocks.0.attn.q.quantizer"]
    assert "per-channel" in reasons["blocks.0.mlp.fc1.input_quantizer"]
    _assert_close_to_fake_quant(qmodel, exported.path, images)


def test_header_names_model_and_config(float_model, images, tmp_path):
    qmodel = _quantize(float_model, images, "minmax", 8, 8)
    header = OrtModel(export_onnx(qmodel, tmp_path / "h.onnx").path).header
    assert header.model_name == MODEL and header.config.w_bits == 8
    assert {p.slot for p in header.points} == set(qmodel.quantizers())


# ---------------------------------------------------------------- storage offsets (no onnxruntime needed)


def _onnx_qdq(x: torch.Tensor, params, lo: int, hi: int) -> torch.Tensor:
    """ONNX semantics, written out: [clip] → saturate(round_half_even(x / scale) + zp) → (q − zp) · scale."""
    scale, zero = torch.from_numpy(params.scale), torch.from_numpy(params.zero_point.astype(np.float32))
    if params.clip is not None:
        x = x.clamp(*params.clip)
    codes = torch.clamp(torch.round(x / scale) + zero, lo, hi)
    return (codes - zero) * scale


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), symmetric=st.booleans(),
       low=st.floats(-4, 3), width=st.floats(0.05, 6), seed=st.integers(0, 2**16))
def test_storage_offset_reproduces_fake_quant(bits, signed, symmetric, low, width, seed):
    """Whatever the code range and zero point, the stored QDQ computes our fake-quant, or export says why not."""
    quantizer = build_quantizer({"kind": "uniform", "bits": bits, "signed": signed, "symmetric": symmetric})
    x = low + width * torch.rand(500, generator=torch.Generator().manual_seed(seed))
    quantizer.calibrate(x)
    probe = torch.linspace(low - width, low + 2 * width, 2000)
    for storage in (UINT8, INT8):
        weight = storage == INT8
        params = _qdq_params(quantizer, storage, weight=weight)
        if isinstance(params, str):
            assert "do not fit" in params
            continue
        assert storage[0] <= int(params.zero_point) <= storage[1]
        if weight:  # weights are stored as codes: int_repr moved by the offset, read back by DequantizeLinear
            codes = quantizer.int_repr(probe) + params.offset
            assert storage[0] <= int(codes.min()) and int(codes.max()) <= storage[1]
            exported = (codes - torch.from_numpy(params.zero_point.astype(np.float32))) * torch.from_numpy(
                params.scale)
        else:
            exported = _onnx_qdq(probe, params, *storage)
        torch.testing.assert_close(exported, quantizer(probe), atol=0, rtol=0)


def test_storage_offset_moves_an_outside_zero_point_into_range():
    """4-bit codes 0..15 with zero point −20 (a range far above 0) fit uint8 with offset 20; 8-bit ones do not."""
    low_bit = build_quantizer({"kind": "uniform", "bits": 4})
    low_bit.set_range(torch.tensor([10.0]), torch.tensor([11.5]))
    params = _qdq_params(low_bit, UINT8, weight=False)
    assert params.offset == -int(low_bit.zero_point) and int(params.zero_point) == 0
    full = build_quantizer({"kind": "uniform", "bits": 8})
    full.set_range(torch.tensor([10.0]), torch.tensor([11.5]))
    assert "do not fit" in _qdq_params(full, UINT8, weight=False)


# ---------------------------------------------------------------- errors


def test_ort_model_errors_are_readable(tmp_path):
    with pytest.raises(VitqError, match="does not exist"):
        OrtModel(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx file")
    with pytest.raises(VitqError, match="cannot load"):
        OrtModel(corrupt)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(plain), dynamo=False)
    with pytest.raises(VitqError, match="no vitq metadata"):
        _ = OrtModel(plain).header
    with pytest.raises(VitqError, match="optimization"):
        OrtModel(plain, optimization="max")


def test_swin_exports_and_runs(tmp_path):
    """Window attention (relative position bias, shifted-window mask) and patch merging trace to ONNX too."""
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=48, depths=(2, 2),
                             num_heads=(3, 6)).eval()
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    qmodel = vitq.quantize(swin, vitq.QuantConfig(method="percentile", w_bits=6, a_bits=6), images[:2],
                           progress=False)
    exported = export_onnx(qmodel, tmp_path / "swin.onnx")
    int8_weights = {p.slot for p in exported.points if p.form == "int8 weight"}
    assert "layers.1.downsample.reduction.weight_quantizer" in int8_weights
    _assert_close_to_fake_quant(qmodel, exported.path, images)


def test_export_traces_at_the_size_the_patch_embedding_insists_on(tmp_path):
    """A model built at another size than its pretrained config's (here 98 px, DINOv2's config says 518)."""
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=1, img_size=98).eval()
    images = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="minmax", calib_size=2), images, progress=False)
    exported = export_onnx(qmodel, tmp_path / "dinov2.onnx")
    assert OrtModel(exported.path, threads=1)(images).shape == model(images).shape  # features: no head
