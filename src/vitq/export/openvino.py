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
  them float, as NNCF's transformer preset does).

:data:`OPENVINO_TARGET` is the list of overrides that gives a method exactly that structure (``--target
openvino``). The export names every point that misses it, with what to change.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vitq.errors import VitqError
from vitq.export.onnx import METADATA_KEY, OnnxExport, PointExport, export_header, export_onnx
from vitq.files import atomic_folder
from vitq.quantized_model import QuantizedModel

#: overrides that shape a method's quantizers for OpenVINO's int8 kernels (``--target openvino``), applied before
#: the user's own overrides: symmetric weights, symmetric q and k, float v and softmax output
OPENVINO_TARGET = ("*.weight_quantizer=symmetric", "*attn.q=symmetric", "*attn.k=symmetric", "*attn.v=float",
                   "*attn.softmax=float")
#: runtime name -> its overrides
TARGETS: dict[str, tuple[str, ...]] = {"openvino": OPENVINO_TARGET}
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


def export_openvino(qmodel: QuantizedModel, folder: str | Path, *,
                    calibration_files: list[str] | None = None) -> OpenVinoExport:
    """Write ``qmodel`` as OpenVINO IR into ``folder`` (:data:`XML_FILE` and :data:`BIN_FILE`; input ``image``
    [batch, 3, H, W], output ``logits``). The folder is written whole or not at all; the vitq header is in the
    model's ``rt_info`` under ``vitq``."""
    try:
        import openvino as ov
    except ImportError:
        raise VitqError("--format openvino needs OpenVINO: pip install 'vitq[openvino]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        exported = export_onnx(qmodel, onnx_path, calibration_files=calibration_files, signed_activations=True)
        model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(export_header(qmodel, exported.points, calibration_files)), [METADATA_KEY])
    with atomic_folder(Path(folder)) as partial:
        # the weights stay float32 where they are float (biases, LayerNorm): the model computed is the one exported
        ov.save_model(model, str(partial / XML_FILE), compress_to_fp16=False)
    return OpenVinoExport(Path(folder) / XML_FILE, exported.points, _slow_points(qmodel, exported))


__all__ = ["BIN_FILE", "OPENVINO_TARGET", "TARGETS", "XML_FILE", "OpenVinoExport", "export_openvino"]
