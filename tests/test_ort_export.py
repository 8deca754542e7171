"""Tests of vitq.export.ort: the onnxruntime-optimised export and the bias folding into its integer GEMMs."""

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close_to_fake_quant, random_images
from onnx import TensorProto, helper, numpy_helper

import vitq
from vitq.eval.ort import OrtModel, open_session
from vitq.export.onnx import export_onnx
from vitq.export.ort import export_onnxruntime, fold_bias_into_integer_matmul

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
