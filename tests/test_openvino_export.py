"""Tests of ``--deploy openvino`` (symmetric overrides, integer zero points), vitq.export.openvino (IR export) and
vitq.eval.ov (the OpenVINO runner) on timm's tiny ``test_vit``.

The IR is run with float32 inference precision where it is compared with the fake-quant model (a CPU with AMX
would otherwise run the float layers in bf16); the check is the loose whole-model one of the ONNX tests.
"""

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close_to_fake_quant, random_images

import vitq
from vitq.config import PointOverride
from vitq.errors import VitqError
from vitq.eval.ort import OrtModel
from vitq.export.int8_gemm import int8_gemm_saturates
from vitq.export.onnx import export_onnx
from vitq.export.openvino import XML_FILE, export_openvino, hoist_qdq_over_layout

ov = pytest.importorskip("openvino")
from vitq.eval.ov import OpenVinoModel  # noqa: E402  (needs openvino)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # torch's TorchScript ONNX exporter


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return random_images(6)


def _quantize(float_model, images, *overrides: str, method: str = "percentile",
              deploy: str | None = None) -> vitq.QuantizedModel:
    config = vitq.QuantConfig(method=method, calib_size=3, overrides=[PointOverride.parse(o) for o in overrides],
                              deploy=deploy)
    return vitq.quantize(float_model, config, images[:3], progress=False)


def test_symmetric_override_makes_zero_points_zero_and_codes_signed(float_model, images):
    qmodel = _quantize(float_model, images, deploy="openvino")
    by_role: dict[str, list] = {}
    for slot in qmodel.slots():
        by_role.setdefault(slot.role, []).append(slot.quantizer)
    for role in ("weight", "attn_q", "attn_k"):
        for quantizer in by_role[role]:
            assert quantizer.signed and quantizer.symmetric and not quantizer.zero_point.any(), role
            assert quantizer.q_min == -128 and quantizer.q_max == 127
    assert all(q is None for q in by_role["attn_v"] + by_role["softmax"])
    assert any(q.zero_point.any() for q in by_role["post_ln"])  # the other activations keep their zero points


def test_symmetric_override_parses_and_refuses_kinds_without_a_symmetric_form(float_model):
    override = PointOverride.parse("*.weight_quantizer=symmetric")
    assert override.symmetric and not override.keep_float and override.kind is None
    spec = override.apply({"kind": "uniform", "bits": 4, "granularity": "channel"})
    assert spec == {"kind": "uniform", "bits": 4, "granularity": "channel", "symmetric": True, "signed": True}
    config = vitq.QuantConfig(method="repq-vit", overrides=[PointOverride.parse("*attn.softmax=symmetric")])
    with pytest.raises(VitqError, match="'log_sqrt2' has no symmetric form"):
        vitq.prepare(float_model, config)


def test_signed_activations_are_stored_as_int8_with_zero_point_0(float_model, images, tmp_path):
    qmodel = _quantize(float_model, images, deploy="openvino")
    exported = export_onnx(qmodel, tmp_path / "m.onnx", signed_activations=True)
    forms = {p.slot: p.form for p in exported.points}
    assert forms["blocks.0.attn.q.quantizer"] == forms["blocks.0.attn.k.quantizer"] == "int8 QDQ"
    assert forms["blocks.0.attn.qkv.input_quantizer"] == "uint8 QDQ"
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    constants = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                 if n.op_type == "Constant"}
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear" and "/attn/q/" in n.name]
    assert q_nodes and all(constants[n.input[2]].dtype == np.int8 and constants[n.input[2]] == 0 for n in q_nodes)


def test_hoisting_qdq_over_layout_ops_leaves_the_function_unchanged(float_model, images, tmp_path):
    qmodel = _quantize(float_model, images, deploy="openvino")
    export_onnx(qmodel, tmp_path / "m.onnx", signed_activations=True)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert hoist_qdq_over_layout(model.graph) == 6  # the attention projection's input, once per block
    assert hoist_qdq_over_layout(model.graph) == 0
    producer = {out: node for node in model.graph.node for out in node.output}
    proj = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and "attn/proj/input" in n.name]
    assert all(producer[n.input[0]].op_type == "MatMul" for n in proj)  # now right after the attention product
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "hoisted.onnx"))
    before = OrtModel(tmp_path / "m.onnx", threads=1, optimization="disable")(images)
    after = OrtModel(tmp_path / "hoisted.onnx", threads=1, optimization="disable")(images)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.fixture(scope="module")
def openvino_ir(float_model, images, tmp_path_factory):
    """The percentile W8A8 model with ``--deploy openvino`` and its IR: ``(qmodel, export)``."""
    qmodel = _quantize(float_model, images, deploy="openvino")
    return qmodel, export_openvino(qmodel, tmp_path_factory.mktemp("ir") / "ir", calibration_files=["a.jpg"])


@pytest.mark.skipif(int8_gemm_saturates(), reason="x86 without VNNI: OpenVINO's int8 kernels compute 8-bit weights "
                    "approximately (4x the quantization error on test_vit, seen on an AVX2-only AMD EPYC)")
@pytest.mark.filterwarnings("error::RuntimeWarning")  # no warning where the int8 kernels are exact
def test_openvino_ir_computes_the_fake_quant_model(openvino_ir, images):
    qmodel, exported = openvino_ir
    assert_close_to_fake_quant(qmodel, OpenVinoModel(exported.xml.parent, threads=1, precision="f32")(images), images)


def test_openvino_on_a_cpu_without_vnni_warns_that_its_int8_kernels_are_approximate(openvino_ir, monkeypatch):
    monkeypatch.setattr("vitq.eval.ov.int8_gemm_saturates", lambda: True)
    with pytest.warns(RuntimeWarning, match="approximately"):
        OpenVinoModel(openvino_ir[1].xml.parent, threads=1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the no-VNNI note: the kernels are checked, not the numbers
def test_openvino_ir_runs_every_linear_on_int8_kernels_and_keeps_its_header(openvino_ir, tmp_path):
    qmodel, exported = openvino_ir
    assert exported.xml.name == XML_FILE and exported.bin.is_file()
    assert exported.slow_points == []
    model = OpenVinoModel(exported.xml.parent, threads=1, precision="f32")
    header = model.header
    assert header.model_name == qmodel.model_name and header.config == qmodel.config
    assert header.calibration_files == ["a.jpg"] and len(header.points) == len(exported.points)
    # the integer kernels: every Linear runs as an int8 FullyConnected
    runtime = model.compiled.get_runtime_model()
    precisions = [op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ops()
                  if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"]
    assert precisions and all(p in ("u8", "i8") for p in precisions), precisions


def test_points_openvino_cannot_run_on_int8_kernels_are_named(float_model, images, tmp_path):
    exported = export_openvino(_quantize(float_model, images), tmp_path / "ir")
    why = dict(exported.slow_points)
    assert "zero points" in why["blocks.0.attn.qkv.weight_quantizer"]
    assert "q·kᵀ" in why["blocks.0.attn.q.quantizer"] and "q·kᵀ" in why["blocks.0.attn.k.quantizer"]
    assert any(words in why["blocks.0.attn.softmax.quantizer"] for words in ("unfused", "float path"))
    assert "blocks.0.attn.qkv.input_quantizer" not in why  # a per-tensor asymmetric input is what FC takes


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace under openvino.convert_model
def test_openvino_model_errors_are_readable(float_model, images, tmp_path):
    with pytest.raises(VitqError, match="does not exist"):
        OpenVinoModel(tmp_path / "missing")
    (tmp_path / "notxml.onnx").write_bytes(b"x")
    with pytest.raises(VitqError, match="not an OpenVINO IR"):
        OpenVinoModel(tmp_path / "notxml.onnx")
    (tmp_path / "corrupt.xml").write_text("<net>")
    with pytest.raises(VitqError, match="OpenVINO cannot load"):
        OpenVinoModel(tmp_path / "corrupt.xml")
    plain = ov.convert_model(torch.nn.Linear(4, 2), example_input=torch.zeros(1, 4))
    ov.save_model(plain, str(tmp_path / "plain.xml"))
    with pytest.raises(VitqError, match="no vitq metadata"):
        _ = OpenVinoModel(tmp_path / "plain.xml").header
    with pytest.raises(VitqError, match="precision"):
        OpenVinoModel(tmp_path / "plain.xml", precision="f16")
