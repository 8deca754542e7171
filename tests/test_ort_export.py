"""Tests of vitq.export.ort (the onnxruntime-optimised export, the bias folding into its integer GEMMs) and
vitq.export.int8_gemm (the uint8 weights its GEMMs compute exactly on x86 without VNNI)."""

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close_to_fake_quant, random_images
from onnx import TensorProto, helper, numpy_helper

import vitq
from vitq.calib.runner import calibrating
from vitq.eval.ort import OrtModel, open_session
from vitq.export import int8_gemm
from vitq.export.int8_gemm import unsigned_weight_codes
from vitq.export.matmul_nbits import FORM, nbits_problem, nbits_weight
from vitq.export.onnx import export_onnx
from vitq.export.ort import export_onnxruntime, fold_bias_into_integer_matmul
from vitq.quantizers import build_quantizer

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # torch's TorchScript ONNX exporter

K, N = 4, 5


def _integer_gemm_graph(rng) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Four ``MatMulIntegerToFloat`` on one uint8 input: + bias (folds), + a graph input (a residual, stays),
    + a [1, N] constant (not a bias vector, stays), and one whose output also leaves the graph (stays)."""
    values = {"weight": rng.integers(-128, 128, (K, N)).astype(np.int8),
              "a_scale": np.array(0.05, np.float32), "b_scale": rng.uniform(0.01, 0.1, N).astype(np.float32),
              "a_zero": np.array(7, np.uint8), "b_zero": np.zeros(N, np.int8),
              "bias": rng.normal(size=N).astype(np.float32), "row": rng.normal(size=(1, N)).astype(np.float32)}
    gemm_inputs = ["codes", "weight", "a_scale", "b_scale", "a_zero", "b_zero"]
    nodes = [helper.make_node("MatMulIntegerToFloat", gemm_inputs, [f"g{i}"], domain="com.microsoft")
             for i in range(4)]
    nodes += [helper.make_node("Add", ["g0", "bias"], ["biased"]),
              helper.make_node("Add", ["residual", "g1"], ["residual_sum"]),
              helper.make_node("Add", ["g2", "row"], ["row_sum"]),
              helper.make_node("Add", ["g3", "bias"], ["also_biased"])]
    inputs = [helper.make_tensor_value_info("codes", TensorProto.UINT8, [2, 3, K]),
              helper.make_tensor_value_info("residual", TensorProto.FLOAT, [2, 3, N])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
               for name in ("biased", "residual_sum", "row_sum", "also_biased", "g3")]
    graph = helper.make_graph(nodes, "gemms", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in values.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model, values


def test_fold_bias_folds_a_linear_bias_and_nothing_else(tmp_path):
    rng = np.random.default_rng(0)
    model, values = _integer_gemm_graph(rng)
    onnx.save(model, str(tmp_path / "before.onnx"))
    assert fold_bias_into_integer_matmul(model.graph) == 1
    assert fold_bias_into_integer_matmul(model.graph) == 0
    gemms = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert list(gemms[0].input) == ["codes", "weight", "a_scale", "b_scale", "a_zero", "b_zero", "bias"]
    assert gemms[0].output[0] == "biased" and [n.op_type for n in model.graph.node].count("Add") == 3
    onnx.save(model, str(tmp_path / "after.onnx"))
    feeds = {"codes": rng.integers(0, 256, (2, 3, K)).astype(np.uint8),
             "residual": rng.normal(size=(2, 3, N)).astype(np.float32)}
    before = open_session(tmp_path / "before.onnx", threads=1, optimization="disable").run(None, feeds)
    after = open_session(tmp_path / "after.onnx", threads=1, optimization="disable").run(None, feeds)
    # the closed form: (a − z_a)·(W − z_w)·s_a·s_w + bias
    product = (feeds["codes"].astype(np.int64) - 7) @ values["weight"].astype(np.int64)
    expected = product * (values["a_scale"] * values["b_scale"]) + values["bias"]
    np.testing.assert_allclose(after[0], expected, rtol=1e-6, atol=1e-5)
    for got, reference in zip(after, before, strict=True):
        np.testing.assert_array_equal(got, reference)


def test_unsigned_weight_codes_compute_the_closed_form_where_int8_codes_saturate(tmp_path):
    """Codes 0..255 times int8 weights up to ±128 saturate an int16 pair sum on x86 without VNNI; the same weights
    stored as uint8 (zero point + 128) give the closed form on every CPU."""
    rng = np.random.default_rng(0)
    model, values = _integer_gemm_graph(rng)
    assert unsigned_weight_codes(model.graph) == 1  # one weight initializer, shared by the four GEMMs
    assert unsigned_weight_codes(model.graph) == 0
    stored = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    assert "weight" not in stored and "b_zero" not in stored
    np.testing.assert_array_equal(stored["weight_uint8"].astype(np.int64) - stored["b_zero_uint8"],
                                  values["weight"].astype(np.int64))
    onnx.save(model, str(tmp_path / "unsigned.onnx"))
    feeds = {"codes": np.full((2, 3, K), 255, np.uint8), "residual": np.zeros((2, 3, N), np.float32)}
    feeds["codes"][1] = rng.integers(0, 256, (3, K))
    session = open_session(tmp_path / "unsigned.onnx", threads=1, optimization="disable", unsigned_weights=False)
    biased = session.run(["biased"], feeds)[0]
    product = (feeds["codes"].astype(np.int64) - 7) @ values["weight"].astype(np.int64)
    np.testing.assert_allclose(biased, product * (values["a_scale"] * values["b_scale"]) + values["bias"],
                               rtol=1e-6, atol=1e-5)


def test_an_exported_model_with_unsigned_weights_computes_its_qdq_graph(float_model, tmp_path):
    """Every weight of a W8A8 export meets a uint8 activation, so every one is changed, and the result is the QDQ
    graph run unfused (dequantized weights, float MatMul: no integer kernel involved)."""
    images = random_images(4)
    config = vitq.QuantConfig(method="percentile", w_bits=8, a_bits=8, calib_size=2)
    qmodel = vitq.quantize(float_model, config, images[:2], progress=False)
    exported = export_onnxruntime(qmodel, tmp_path / "ort.onnx")
    weights = [p for p in exported.points if p.slot.endswith("weight_quantizer")]
    assert unsigned_weight_codes(onnx.load(str(exported.path)).graph) == len(weights)
    qdq = export_onnx(qmodel, tmp_path / "qdq.onnx").path
    assert unsigned_weight_codes(onnx.load(str(qdq)).graph) == len(weights)
    reference = OrtModel(qdq, threads=1, optimization="disable", unsigned_weights=False)(images)
    for path in (exported.path, qdq):
        logits = OrtModel(path, threads=1, unsigned_weights=True)(images)
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("machine", "flags", "saturates"), [
    ("x86_64", "flags : fpu sse avx2 fma", True), ("x86_64", "flags : avx2 avx512f avx512_vnni", False),
    ("AMD64", "flags : avx2 avx_vnni", False), ("x86_64", None, True), ("aarch64", "Features : asimd", False)])
def test_int8_gemm_saturates_on_x86_without_vnni(monkeypatch, tmp_path, machine, flags, saturates):
    monkeypatch.setattr(int8_gemm.platform, "machine", lambda: machine)
    monkeypatch.setattr(int8_gemm, "CPUINFO", tmp_path / "cpuinfo")  # None: no file to read
    if flags is not None:
        (tmp_path / "cpuinfo").write_text(flags)
    assert int8_gemm.int8_gemm_saturates() is saturates


def test_onnxruntime_export_computes_the_qdq_export(float_model, tmp_path):
    images = random_images(6)
    config = vitq.QuantConfig(method="minmax", w_bits=4, a_bits=4, calib_size=3)
    qmodel = vitq.quantize(float_model, config, images[:3], progress=False)
    qdq = export_onnx(qmodel, tmp_path / "qdq.onnx")
    exported = export_onnxruntime(qmodel, tmp_path / "ort.onnx", calibration_files=["a.jpg"])
    assert [p.form for p in exported.points] == [p.form for p in qdq.points]
    model = OrtModel(tmp_path / "ort.onnx", threads=1)
    logits = model(images)
    torch.testing.assert_close(logits, OrtModel(qdq.path, threads=1)(images), rtol=1e-5, atol=1e-5)
    assert_close_to_fake_quant(qmodel, logits, images)
    assert model.header.config == qmodel.config and model.header.calibration_files == ["a.jpg"]
    nodes = onnx.load(str(tmp_path / "ort.onnx")).graph.node
    gemms = [n for n in nodes if n.op_type == "MatMulIntegerToFloat"]
    # qkv, proj and fc2 of every block take their bias in the GEMM (fc1's goes into BiasGelu; the head is a Gemm)
    depth = len(float_model.blocks)
    assert sum(len(n.input) == 7 and bool(n.input[6]) for n in gemms) == 3 * depth
    assert [n.op_type for n in nodes].count("BiasGelu") == depth


def test_onnxruntime_export_of_a_tanq_softmax_has_no_float_path(float_model, tmp_path):
    """DopQ-ViT's TanQ softmax codes + level lookup survive onnxruntime's fusions."""
    images = random_images(6)
    config = vitq.QuantConfig(method="dopq-vit", w_bits=8, a_bits=8, calib_size=3, deploy="onnxruntime")
    qmodel = vitq.quantize(float_model, config, images[:3], progress=False)
    exported = export_onnxruntime(qmodel, tmp_path / "ort.onnx")
    assert not exported.float_points
    assert_close_to_fake_quant(qmodel, OrtModel(exported.path, threads=1)(images), images)


# ---------------------------------------------------------------------------------------- MatMulNBits
def _decode(stored) -> np.ndarray:
    """The [N, K] weight MatMulNBits computes with, decoded element by element from its documented layout."""
    n_blocks = stored.packed.shape[1]
    zero_bytes = -(-n_blocks // 2)
    weight = np.zeros((stored.out_features, stored.in_features))
    for n in range(stored.out_features):
        for k in range(stored.in_features):
            block, within = divmod(k, stored.block_size)
            byte = int(stored.packed[n, block, within // 2])
            code = byte & 15 if within % 2 == 0 else byte >> 4
            zero_byte = int(stored.zero_points[n * zero_bytes + block // 2])
            zero = zero_byte & 15 if block % 2 == 0 else zero_byte >> 4
            weight[n, k] = (code - zero) * stored.scales[n * n_blocks + block]
    return weight


@pytest.mark.parametrize(("bits", "granularity", "in_features"), [
    (4, "channel", 192), (3, "channel", 40), (2, "channel", 64), (4, "tensor", 48), (4, "group", 96), (3, "group", 64)])
def test_nbits_storage_decodes_to_the_fake_quant_weight(bits, granularity, in_features):
    weight = torch.randn(6, in_features) * torch.linspace(0.1, 2.0, 6)[:, None]
    spec = {"kind": "uniform", "bits": bits, "granularity": granularity, "axis": 0}
    if granularity == "group":
        spec["group_size"] = 32 if in_features % 32 == 0 else 16
    quantizer = build_quantizer(spec)
    with calibrating([quantizer]):
        quantizer(weight)
    assert nbits_problem(quantizer) is None
    stored = nbits_weight(quantizer, weight)
    if granularity == "group":
        assert stored.block_size == spec["group_size"]
    assert stored.packed.dtype == np.uint8 and stored.packed.shape[2] == stored.block_size // 2
    np.testing.assert_allclose(_decode(stored), quantizer(weight).double().numpy(), rtol=0, atol=1e-6)


def test_nbits_problem_names_the_weights_without_a_4_bit_form():
    weight = torch.randn(4, 32)
    cases = {"8-bit codes": {"kind": "uniform", "bits": 8, "granularity": "channel", "axis": 0},
             "group size 8": {"kind": "uniform", "bits": 4, "granularity": "group", "group_size": 8},
             "not a uniform": {"kind": "log2", "bits": 4}}
    for expected, spec in cases.items():
        quantizer = build_quantizer(spec)
        with calibrating([quantizer]):
            quantizer(weight)
        assert expected in nbits_problem(quantizer)
    quantizer = build_quantizer({"kind": "uniform", "bits": 4, "granularity": "channel", "axis": 0})
    with calibrating([quantizer]):
        quantizer(weight)
    quantizer.zero_point.add_(0.5)
    assert "fractional zero point" in nbits_problem(quantizer)


@pytest.mark.parametrize(("method", "w_bits", "a_bits"), [("gptq", 4, 16), ("gptq[group_size=16]", 3, 16),
                                                         ("minmax", 4, 8)])
def test_packed_weights_run_as_matmul_nbits(float_model, tmp_path, method, w_bits, a_bits):
    images = random_images(6)
    name, _, option = method.partition("[")
    options = dict([option.rstrip("]").split("=")]) if option else {}
    config = vitq.QuantConfig(method=name, w_bits=w_bits, a_bits=a_bits, calib_size=3,
                              options={k: int(v) for k, v in options.items()})
    qmodel = vitq.quantize(float_model, config, images[:3], progress=False)
    exported = export_onnxruntime(qmodel, tmp_path / "packed.onnx", packed_weights=True)
    unpacked = export_onnxruntime(qmodel, tmp_path / "int8.onnx")
    linears = sum(p.role == "weight" and not p.slot.startswith("patch_embed") for p in exported.points)
    assert sum(p.form == FORM for p in exported.points) == linears  # every Linear; the patch-embedding Conv is int8
    assert (tmp_path / "packed.onnx").stat().st_size < 0.75 * (tmp_path / "int8.onnx").stat().st_size
    nodes = onnx.load(str(tmp_path / "packed.onnx")).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == linears
    assert sum(len(n.input) == 6 and bool(n.input[5]) for n in nbits) >= 3 * len(float_model.blocks)  # biases in
    model = OrtModel(tmp_path / "packed.onnx", threads=1)
    assert [p.form for p in model.header.points] == [p.form for p in exported.points]
    logits = model(images)
    with torch.no_grad():
        reference, float_logits = qmodel(images), float_model(images)
    quantization_error = (float_logits - reference).abs().mean()  # gptq rewrites the weights: vs the float model
    if a_bits == 16:  # float activations: the fake-quant model up to float32 summation order
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, OrtModel(unpacked.path, threads=1)(images), rtol=1e-4, atol=1e-4)
    else:  # quantized inputs: float32 sums against integer GEMMs move a few codes across a rounding boundary
        assert_close_to_fake_quant(qmodel, logits, images)
    export_onnxruntime(qmodel, tmp_path / "int8_compute.onnx", packed_weights=True, accuracy="int8")
    assert {a.name: a.i for n in onnx.load(str(tmp_path / "int8_compute.onnx")).graph.node
            if n.op_type == "MatMulNBits" for a in n.attribute}["accuracy_level"] == 4
    int8_compute = OrtModel(tmp_path / "int8_compute.onnx", threads=1)(images)
    assert (int8_compute - reference).abs().mean() < 0.5 * quantization_error  # one more rounding of the input
