"""Run an exported ONNX file with onnxruntime behind the ``nn.Module`` interface :func:`vitq.evaluate` expects.

    model = OrtModel("deit_tiny_w8a8.onnx", threads=2)
    vitq.evaluate(model, (images, labels))

The file's vitq header (:attr:`OrtModel.header`) says which timm model it came from (hence
the preprocessing) and with which calibration split, so an evaluation can use the same images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from vitq.config import QuantConfig, first_error
from vitq.errors import VitqError
from vitq.export.int8_gemm import int8_gemm_saturates, unsigned_weight_codes
from vitq.export.onnx import METADATA_KEY
from vitq.models.registry import check_model_name

#: onnxruntime graph optimisation levels by name
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int | None = None, optimization: str = "all"):
    """onnxruntime session options: ``threads`` intra-op threads (None: onnxruntime's default, one per
    core), ``optimization`` one of :data:`OPTIMIZATION_LEVELS` ("all": QDQ → integer-kernel fusions)."""
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise VitqError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no hardware-specific-optimisation warnings
    # A weight DequantizeLinear feeding a MatMul whose input stays float (a float-path point) is fused into
    # MatMulNBits, by default at accuracy level 4, which quantizes that float input to int8 on the fly: a
    # different model. Level 1 computes in float32, so the fused graph still computes the exported model.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


def open_session(path: str | Path, threads: int | None = None, optimization: str = "all",
                 save_to: str | Path | None = None, unsigned_weights: bool | None = None):
    """An onnxruntime CPU session for ``path``; a missing or unreadable file raises :class:`VitqError`.
    ``save_to``: also write the graph as optimised at level ``optimization`` there (the file's own graph).

    ``unsigned_weights``: run the file with its int8 weights stored as uint8 (:func:`unsigned_weight_codes`), which
    onnxruntime computes exactly on every CPU; None (the default): where its u8·s8 GEMMs saturate (x86 without
    VNNI, :func:`vitq.export.int8_gemm.int8_gemm_saturates`) and no ``save_to`` is given."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise VitqError(f"ONNX file {path} does not exist")
    try:
        options = session_options(threads, optimization)
        if save_to is not None:
            options.optimized_model_filepath = str(save_to)
        if unsigned_weights is None:
            unsigned_weights = save_to is None and int8_gemm_saturates()
        source = _unsigned_weights(path) if unsigned_weights else None
        return ort.InferenceSession(source or str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for corrupt files
        raise VitqError(f"onnxruntime cannot load {path}: {err}") from None


def _unsigned_weights(path: Path) -> bytes | None:
    """The ONNX file ``path`` serialised with its int8 weights as uint8, or None if it has none to change."""
    import onnx

    model = onnx.load(str(path))
    return model.SerializeToString() if unsigned_weight_codes(model.graph) else None


class OnnxPoint(BaseModel):
    """One quantizer slot of the export report (:class:`vitq.export.onnx.PointExport`)."""

    model_config = ConfigDict(extra="allow")

    slot: str
    form: str


class OnnxHeader(BaseModel):
    """The vitq metadata of an exported ONNX file."""

    model_config = ConfigDict(extra="allow")

    model_name: str
    config: QuantConfig
    calibration_files: list[str] | None = None
    points: list[OnnxPoint]


def parse_header(text: str | None, path: Path) -> OnnxHeader:
    """The vitq header ``text`` (JSON) of the exported file ``path``, validated: a timm model name, a valid config,
    well-typed points. Missing or corrupt: one :class:`VitqError`."""
    if text is None:
        raise VitqError(f"{path} has no vitq metadata (was it written by 'vitq export'?)")
    try:
        header = OnnxHeader.model_validate_json(text)
    except ValidationError as err:
        where, message, _ = first_error(err)
        raise VitqError(f"corrupt vitq metadata in {path}: {where or 'header'}: {message}") from None
    try:
        check_model_name(header.model_name)
    except VitqError as err:
        raise VitqError(f"corrupt vitq metadata in {path}: {err}") from None
    return header


class OrtModel(nn.Module):
    """An onnxruntime session as a module: ``forward(images) -> logits`` (torch tensors, CPU).
    ``unsigned_weights``: see :func:`open_session` (None: uint8 weights where int8 ones would saturate)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, optimization: str = "all",
                 unsigned_weights: bool | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = open_session(path, threads, optimization, unsigned_weights=unsigned_weights)
        # files written by vitq use INPUT_NAME/OUTPUT_NAME; other single-input classifiers work too
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @property
    def header(self) -> OnnxHeader:
        """The vitq header written by :func:`vitq.export.onnx.export_onnx` (model name, config, points),
        validated: a timm model name, a valid config, well-typed points."""
        return parse_header(self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), self.path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: array})[0])
