"""Run an OpenVINO IR written by ``vitq export --format openvino`` behind the ``nn.Module`` interface
:func:`vitq.evaluate` expects.

    model = OpenVinoModel("runs/w8a8_openvino", threads=2)
    vitq.evaluate(model, (images, labels))

The model is compiled for OpenVINO's CPU plugin with its defaults (the latency hint, and the inference
precision the CPU offers: bf16 on CPUs with AMX or AVX512-BF16 for the layers that stay float), limited to
``threads`` inference threads; ``precision="f32"`` keeps those layers in float32 (closest to the fake-quant
model, slower on such CPUs).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.eval.ort import OnnxHeader, parse_header
from vitq.export.int8_gemm import int8_gemm_saturates
from vitq.export.onnx import METADATA_KEY
from vitq.export.openvino import XML_FILE


def model_xml(path: str | Path) -> Path:
    """The IR file of ``path``: the folder written by ``vitq export --format openvino`` or its ``model.xml``."""
    path = Path(path)
    xml = path / XML_FILE if path.is_dir() else path
    if not xml.is_file():
        raise VitqError(f"OpenVINO model {xml} does not exist")
    if xml.suffix != ".xml":
        raise VitqError(f"{xml} is not an OpenVINO IR (.xml) file; give the folder written by "
                        "'vitq export --format openvino'")
    return xml


#: inference precisions of the layers that stay float: the CPU's default (bf16 where it has AMX/AVX512-BF16), f32
PRECISIONS = ("default", "f32")


def compile_model(path: str | Path, threads: int | None = None, precision: str = "default"):
    """The OpenVINO model and its CPU compiled model of the IR at ``path`` (see :func:`model_xml`); ``threads``
    inference threads (None: OpenVINO's default), ``precision`` one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise VitqError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    try:
        import openvino as ov
    except ImportError:
        raise VitqError("--backend openvino needs OpenVINO: pip install 'vitq[openvino]'") from None
    xml = model_xml(path)
    config = {"PERFORMANCE_HINT": "LATENCY", **({} if threads is None else {"INFERENCE_NUM_THREADS": threads}),
              **({} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision})}
    if int8_gemm_saturates():
        warnings.warn("this CPU has no int8 dot-product instructions (VNNI): OpenVINO's int8 kernels compute "
                      "8-bit weights only approximately here, so results can fall below the fake-quant model's "
                      "(onnxruntime computes them exactly: --backend onnxruntime)", RuntimeWarning, stacklevel=2)
    core = ov.Core()
    try:
        model = core.read_model(str(xml))
        return model, core.compile_model(model, "CPU", config)
    except RuntimeError as err:  # OpenVINO raises RuntimeError for unreadable IR
        first = next((line for line in str(err).splitlines() if line.strip()), "unreadable")
        raise VitqError(f"OpenVINO cannot load {xml}: {first}") from None


class OpenVinoModel(nn.Module):
    """An OpenVINO compiled model as a module: ``forward(images) -> logits`` (torch tensors, CPU)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, precision: str = "default") -> None:
        super().__init__()
        self.path = model_xml(path)
        self.model, self.compiled = compile_model(self.path, threads, precision)
        self.request = self.compiled.create_infer_request()

    @property
    def header(self) -> OnnxHeader:
        """The vitq header written by :func:`vitq.export.openvino.export_openvino`, validated."""
        rt_info = self.model.get_rt_info()
        text = rt_info[METADATA_KEY].astype(str) if METADATA_KEY in rt_info else None
        return parse_header(text, self.path)

    @property
    def files(self) -> list[Path]:
        """The IR's files (``.xml`` and ``.bin``)."""
        return [self.path, self.path.with_suffix(".bin")]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self.request.infer({0: array})[0].copy())
