"""Export a quantized model to OpenVINO IR (``model.xml`` + ``model.bin``) that runs on OpenVINO's int8 kernels.

The graph is our QDQ ONNX export (:mod:`vitq.export.onnx`: our calibrated scales and zero points in
``QuantizeLinear``/``DequantizeLinear``) converted by OpenVINO's own ONNX front end (``openvino.convert_model``):
each QDQ pair becomes a ``FakeQuantize``, and OpenVINO's low-precision transformations move it into the integer
``FullyConnected``/``MatMul``/``Convolution`` that consumes it. Nothing is hand-written: the IR is what OpenVINO
builds from the ONNX file, plus the vitq header (model name, config, points) in its ``rt_info``.

Which points OpenVINO's CPU plugin runs on integer kernels (measured in ``benchmarks/results/deploy_speed.md``):

- a weight must be symmetric (zero point 0, signed codes): a weight with zero points is decompressed to float and
  its layer runs a float GEMM;
- the inputs of the attention product ``q·kᵀ`` must be symmetric signed (stored as int8);
- quantizing ``v`` and the softmax output adds a ``FakeQuantize`` that is not fused away (slower than keeping
  them float, as NNCF's transformer preset does);
- a per-tensor ``FakeQuantize`` behind a ``Transpose``/``Reshape`` (the input of the attention projection, after
  the heads are merged) is not fused into the ``MatMul`` that produced the tensor: the export moves such a QDQ
  pair above the layout ops (:func:`hoist_qdq_over_layout`), which is exact, since a per-tensor quantizer acts
  on each element alone.

The ``openvino`` deployment target (:mod:`vitq.targets`, ``--deploy openvino``) gives a method exactly that
structure. The export names every point that misses it, with what to change.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vitq.errors import VitqError
from vitq.export.onnx import METADATA_KEY, OnnxExport, PointExport, export_header, export_onnx, graph_consumers
from vitq.files import atomic_folder
from vitq.quantized_model import QuantizedModel

#: the file names inside an exported folder
XML_FILE, BIN_FILE = "model.xml", "model.bin"


@dataclass(frozen=True)
class OpenVinoExport:
    """The written IR (``xml`` and its ``bin``), the per-slot report, and the points OpenVINO cannot run on its
    integer kernels (slot, why)."""

    xml: Path
    points: list[PointExport]
    slow_points: list[tuple[str, str]]

    @property
    def bin(self) -> Path:
        return self.xml.with_suffix(".bin")


def _slow_points(qmodel: QuantizedModel, exported: OnnxExport) -> list[tuple[str, str]]:
    """Points of ``exported`` that OpenVINO runs in float, or that cost it an unfused FakeQuantize, with why."""
    quantizers = {slot.name: slot.quantizer for slot in qmodel.slots()}
    slow = []
    for point in exported.points:
        quantizer = quantizers[point.slot]
        if not point.integer:
            slow.append((point.slot, f"stays on a float path: {point.reason}"))
        elif point.role == "weight" and bool((quantizer.zero_point != 0).any()):
            slow.append((point.slot, "has zero points: OpenVINO runs its layer on float weights (make it "
                                     "symmetric)"))
        elif point.role in ("attn_q", "attn_k") and not (quantizer.signed and quantizer.symmetric):
            slow.append((point.slot, "is not symmetric: OpenVINO runs q·kᵀ in float (make it symmetric)"))
        elif point.role in ("attn_v", "softmax"):
            slow.append((point.slot, "costs an unfused FakeQuantize on the attention product (keep it float)"))
    return slow


#: ops that only move elements: a per-tensor quantizer commutes with them
LAYOUT_OPS = ("Transpose", "Reshape")


def hoist_qdq_over_layout(graph) -> int:
    """Move every per-tensor ``QuantizeLinear → DequantizeLinear`` pair of the ONNX ``graph`` above the chain of
    :data:`LAYOUT_OPS` that feeds it (each with this chain as its only consumer), so that it follows the op that
    computed the values. Returns the number of pairs moved; the graph stays topologically sorted."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers = graph_consumers(graph)
    moved = 0
    for quantize in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        pair = consumers.get(quantize.output[0], [])
        if len(pair) != 1 or pair[0].op_type != "DequantizeLinear" or _has_axis(quantize, producer):
            continue
        dequantize, chain = pair[0], []
        if dequantize.output[0] in {value.name for value in graph.output}:
            continue  # a graph output keeps its name
        node = producer.get(quantize.input[0])
        while node is not None and node.op_type in LAYOUT_OPS and len(consumers[node.output[0]]) == 1:
            chain.append(node)
            node = producer.get(node.input[0])
        if not chain:
            continue
        # source -> Q -> DQ -> first layout op ... last layout op -> the consumers of DQ
        first, last = chain[-1], chain[0]
        for consumer in consumers[dequantize.output[0]]:
            consumer.input[:] = [last.output[0] if name == dequantize.output[0] else name for name in consumer.input]
        quantize.input[0], first.input[0] = first.input[0], dequantize.output[0]
        moved += 1
    if moved:
        _topological_sort(graph)
    return moved


def _has_axis(quantize, producer) -> bool:
    """Whether ``quantize`` has a per-axis scale (a constant scale of more than one element, or one computed)."""
    scale = producer.get(quantize.input[1])
    if scale is None or scale.op_type != "Constant":
        return True
    return any(math.prod(attr.t.dims) != 1 for attr in scale.attribute if attr.name == "value")


def _topological_sort(graph) -> None:
    known = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in known for name in node.input)]
        if not ready:
            raise VitqError("the exported graph has a cycle")
        for node in ready:
            known.update(node.output)
        ordered += ready
        pending = [node for node in pending if node not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def export_openvino(qmodel: QuantizedModel, folder: str | Path, *,
                    calibration_files: list[str] | None = None) -> OpenVinoExport:
    """Write ``qmodel`` as OpenVINO IR into ``folder`` (:data:`XML_FILE` and :data:`BIN_FILE`; input ``image``
    [batch, 3, H, W], output ``logits``). The folder is written whole or not at all; the vitq header is in the
    model's ``rt_info`` under ``vitq``."""
    try:
        import openvino as ov
    except ImportError:
        raise VitqError("--format openvino needs OpenVINO: pip install 'vitq[openvino]'") from None
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        exported = export_onnx(qmodel, onnx_path, calibration_files=calibration_files, signed_activations=True)
        graph = onnx.load(str(onnx_path))
        if hoist_qdq_over_layout(graph.graph):
            onnx.save(graph, str(onnx_path))
        model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(export_header(qmodel, exported.points, calibration_files)), [METADATA_KEY])
    with atomic_folder(Path(folder)) as partial:
        # the weights stay float32 where they are float (biases, LayerNorm): the model computed is the one exported
        ov.save_model(model, str(partial / XML_FILE), compress_to_fp16=False)
    return OpenVinoExport(Path(folder) / XML_FILE, exported.points, _slow_points(qmodel, exported))


__all__ = ["BIN_FILE", "XML_FILE", "OpenVinoExport", "export_openvino",
           "hoist_qdq_over_layout"]
