"""Export a quantized model to ONNX with *our* calibrated scales in QuantizeLinear/DequantizeLinear nodes.

What each quantization point becomes:

- a **weight** with a per-output-channel (or per-tensor) uniform quantizer: its integer codes are stored as
  an int8 initializer and dequantized by one ``DequantizeLinear`` (per-channel ``axis``), so the file holds
  8-bit weights and onnxruntime can fuse ``DQ → MatMul`` into an integer GEMM (``MatMulIntegerToFloat``);
- an **activation** with a per-tensor uniform quantizer: ``QuantizeLinear → DequantizeLinear`` with uint8
  codes. Below 8 bits the codes are a sub-range of uint8, so a ``Clip`` to ``[(q_min − z)·Δ, (q_max − z)·Δ]``
  comes first: then ``round(x/Δ) + z`` never leaves ``[q_min, q_max]`` and the pair computes exactly our
  fake-quant;
- a **softmax output** with a non-uniform quantizer that has integer codes (log2, log√2, TanQ, twin-uniform), or
  a uniform one whose zero point does not fit uint8: **codes + level lookup**. The quantizer's own code
  arithmetic (for log2 ``round(−log2(p/Δ))``, the counterpart of QuantizeLinear's ``round(x/Δ) + z``) gives its
  codes, held as an integer tensor (uint8; int16 for the 8-bit log kinds, whose ``2^8`` non-zero levels and
  exact zero are 257 symbols), and a ``Gather`` on the table of their levels dequantizes them (the
  DequantizeLinear of a non-uniform code book). Same codes as the fake-quant, so the same values;
- anything that has no integer form here — log2, log√2, TanQ, dual-uniform and FP kinds outside the softmax
  output, per-group weights, per-channel or per-head activations (no integer GEMM takes them; onnxruntime's
  fused kernels reject them), a fractional zero point (RepQ-ViT's unrounded reparameterization target) or one
  that does not fit 8-bit storage — keeps a **float path**: the quantizer's own fake-quant arithmetic is
  traced into the graph (exact, not integer), and the export report names every such point with the reason.

Signed codes are moved to the storage type by an offset of ±128 applied to both codes and zero point
(``(q − z)·Δ`` is unchanged): activations are stored as uint8 and weights as int8, the u8·s8 form that x86
integer kernels prefer. With ``signed_activations`` an activation with signed codes is stored as int8 instead
(zero point 0 when it is symmetric): OpenVINO runs the attention product ``q·kᵀ`` on int8 kernels only for
symmetric int8 inputs. The graph is produced by torch's TorchScript ONNX exporter; the custom
``autograd.Function`` s below compute our fake-quant in torch and emit the QDQ nodes through ``symbolic``.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitq.checks import expected_image_size
from vitq.device import model_device
from vitq.errors import VitqError
from vitq.export.integer_kernels import probability_code_book
from vitq.files import atomic_file
from vitq.nn import QLinear
from vitq.quantized_model import QuantizedModel, Slot
from vitq.quantizers import Quantizer
from vitq.quantizers.uniform import UniformQuantizer, integer_grid_problem
from vitq.version import __version__

DEFAULT_OPSET = 17
#: ONNX metadata key holding the export header (model name, config, per-point report) as JSON
METADATA_KEY = "vitq"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
UINT8, INT8 = (0, 255), (-128, 127)


@dataclass(frozen=True)
class PointExport:
    """How one quantizer slot was exported."""

    slot: str
    role: str
    quantizer: str  # e.g. "uniform 8-bit channel"
    form: str  # "int8 weight", "uint8 QDQ", "uint8 QDQ + clip", or "float path"
    reason: str = ""  # why a float path

    @property
    def integer(self) -> bool:
        return self.form != "float path"


@dataclass(frozen=True)
class OnnxExport:
    """The written file and one :class:`PointExport` per quantized slot."""

    path: Path
    points: list[PointExport]

    @property
    def float_points(self) -> list[PointExport]:
        return [p for p in self.points if not p.integer]


@dataclass(frozen=True)
class _QdqParams:
    """Storage-type parameters of one uniform quantizer: codes ``q + offset`` in ``dtype``."""

    scale: np.ndarray  # float32, [] or [channels]
    zero_point: np.ndarray  # storage dtype, same shape
    axis: int | None  # None: per tensor; 0: per output channel (weights)
    clip: tuple[float, float] | None  # bounds applied before QuantizeLinear (activations below 8 bits)
    offset: int


def _qdq_params(quantizer: Quantizer, storage: tuple[int, int], *, weight: bool) -> _QdqParams | str:
    """The QDQ form of ``quantizer`` in ``storage`` (uint8 or int8 range), or why there is none.

    Weights: per tensor or per output channel (axis 0). Activations: per tensor only — an integer GEMM factors
    one input scale out of its sum, and onnxruntime's fused kernels reject per-axis input zero points.
    """
    problem = integer_grid_problem(quantizer, per_row=weight)
    if problem is not None:
        return problem
    lo, hi = storage
    scale = quantizer.scale.detach().float().reshape(-1)
    zero_point = quantizer.zero_point.detach().reshape(-1)
    # one integer offset o for codes and zero points: q + o and z + o must all lie in [lo, hi]
    z_min, z_max = int(zero_point.min()), int(zero_point.max())
    first, last = max(lo - quantizer.q_min, lo - z_min), min(hi - quantizer.q_max, hi - z_max)
    if first > last:
        return f"zero points {z_min}..{z_max} and codes {quantizer.q_min}..{quantizer.q_max} do not fit one " \
               f"8-bit storage range"
    natural = 0 if lo <= quantizer.q_min else (128 if lo == 0 else -128)  # signed codes to uint8 and back
    offset = min(max(natural, first), last)
    per_tensor = quantizer.granularity == "tensor"
    clip = None
    if not weight and (quantizer.q_min + offset > lo or quantizer.q_max + offset < hi):
        clip = (float((quantizer.q_min - zero_point) * scale), float((quantizer.q_max - zero_point) * scale))
    stored_zero = (zero_point + offset).numpy().astype(np.uint8 if lo == 0 else np.int8)
    return _QdqParams(scale=scale.numpy().reshape(()) if per_tensor else scale.numpy(),
                      zero_point=stored_zero.reshape(()) if per_tensor else stored_zero,
                      axis=None if per_tensor else 0, clip=clip, offset=offset)


def _constant(g, array: np.ndarray):
    return g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(array)))


class _QuantizeDequantize(torch.autograd.Function):
    """Our fake-quant (computed by the caller) in torch; ``[Clip →] QuantizeLinear → DequantizeLinear`` in
    ONNX."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fake_quant: torch.Tensor, params: _QdqParams) -> torch.Tensor:
        return fake_quant.clone()

    @staticmethod
    def symbolic(g, x, fake_quant, params: _QdqParams):  # the traced fake_quant ops are then dead code
        if params.clip is not None:
            low, high = (_constant(g, np.array(bound, dtype=np.float32)) for bound in params.clip)
            x = g.op("Clip", x, low, high)
        scale, zero_point = _constant(g, params.scale), _constant(g, params.zero_point)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


class _DequantizeWeight(torch.autograd.Function):
    """The fake-quant weight in torch; ``DequantizeLinear(int8 codes)`` in ONNX.

    For a Linear layer the codes are stored transposed ([in, out], per-channel axis 1) under a Transpose,
    which cancels against the Transpose of ``F.linear``: the exported graph is ``DQ → MatMul``, the pattern
    onnxruntime fuses into an integer GEMM.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, dequantized: torch.Tensor, codes: np.ndarray, params: _QdqParams,
                transposed: bool) -> torch.Tensor:
        return dequantized.clone()

    @staticmethod
    def symbolic(g, weight, dequantized, codes: np.ndarray, params: _QdqParams, transposed: bool):
        scale, zero_point = _constant(g, params.scale), _constant(g, params.zero_point)
        if not transposed:
            axis = {} if params.axis is None else {"axis_i": 0}
            return g.op("DequantizeLinear", _constant(g, codes), scale, zero_point, **axis)
        axis = {} if params.axis is None else {"axis_i": 1}
        dequantized_t = g.op("DequantizeLinear", _constant(g, codes.T), scale, zero_point, **axis)
        return g.op("Transpose", dequantized_t, perm_i=[1, 0])


#: the storage of non-negative codes up to 255, and up to 32767: int16 holds the log quantizers' ``2^8 + 1``
#: symbols (their extra code stands for an exact 0; torch's ONNX exporter has no uint16 constants)
CODE_STORAGE = {"uint8": torch.uint8, "int16": torch.int16}


class _SoftmaxCodesExport(nn.Module):
    """``levels[codes(p)]``: the quantizer's own code arithmetic, its integer codes cast to their storage type, and
    a ``Gather`` on the table of their levels (the DequantizeLinear of a non-uniform code book)."""

    def __init__(self, quantizer: Quantizer, levels: torch.Tensor) -> None:
        super().__init__()
        self.quantizer, self.levels = quantizer, levels.cpu().float()
        self.storage = "uint8" if len(levels) - 1 <= UINT8[1] else "int16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.quantizer.int_repr(x.clamp(0.0, 1.0)).to(CODE_STORAGE[self.storage])
        return self.levels[codes.long()]


class _ActivationExport(nn.Module):
    def __init__(self, quantizer: UniformQuantizer, params: _QdqParams) -> None:
        super().__init__()
        self.quantizer, self.params = quantizer, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeDequantize.apply(x, self.quantizer.quantize_dequantize(x), self.params)


class _WeightExport(nn.Module):
    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor, params: _QdqParams,
                 transposed: bool) -> None:
        super().__init__()
        codes = quantizer.int_repr(weight.detach()) + params.offset
        self.codes = codes.numpy().astype(np.int8)
        self.dequantized = quantizer(weight.detach())
        self.params, self.transposed = params, transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _DequantizeWeight.apply(weight, self.dequantized, self.codes, self.params, self.transposed)


def _slot_export(slot: Slot, signed_activations: bool) -> tuple[PointExport, nn.Module | None]:
    """The report entry of ``slot`` and the module that replaces its quantizer during export (``None``:
    keep the quantizer, i.e. its float fake-quant arithmetic)."""
    quantizer = slot.quantizer
    described = quantizer.describe()
    weight = slot.role == "weight"
    signed = weight or (signed_activations and getattr(quantizer, "signed", False))
    params = _qdq_params(quantizer, INT8 if signed else UINT8, weight=weight)
    if isinstance(params, str) and slot.role == "softmax":
        book = probability_code_book(quantizer)
        if not isinstance(book, str):
            shim = _SoftmaxCodesExport(quantizer, book[1])
            return PointExport(slot.name, slot.role, described, f"{shim.storage} codes + level lookup"), shim
    if isinstance(params, str):
        return PointExport(slot.name, slot.role, described, "float path", params), None
    if weight:
        shim = _WeightExport(quantizer, slot.module.weight, params, transposed=isinstance(slot.module, QLinear))
        return PointExport(slot.name, slot.role, described, "int8 weight"), shim
    form = ("int8" if signed else "uint8") + (" QDQ + clip" if params.clip is not None else " QDQ")
    return PointExport(slot.name, slot.role, described, form), _ActivationExport(quantizer, params)


@contextmanager
def _export_mode(qmodel: QuantizedModel, signed_activations: bool) -> Iterator[list[PointExport]]:
    """Swap every exportable quantizer for its QDQ shim; yields the per-slot report; restores on exit."""
    report, swapped = [], []
    for slot in qmodel.slots():
        if slot.quantizer is None or not slot.quantizer.enabled:
            continue
        entry, shim = _slot_export(slot, signed_activations)
        report.append(entry)
        if shim is not None:
            swapped.append((slot, slot.quantizer))
            setattr(slot.module, slot.attr, shim)
    try:
        yield report
    finally:
        for slot, quantizer in swapped:
            setattr(slot.module, slot.attr, quantizer)


def graph_consumers(graph) -> dict[str, list]:
    """The nodes of an ONNX ``graph`` that read each tensor name, in graph order (for graph rewrites)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def constant_tensors(graph) -> dict:
    """The constant tensors of an ONNX ``graph`` (initializers and ``Constant`` node values, as ``TensorProto``),
    by name."""
    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((attr.t for attr in node.attribute if attr.name == "value"), None)
            if value is not None:
                tensors[node.output[0]] = value
    return tensors


def export_header(qmodel: QuantizedModel, points: list[PointExport],
                  calibration_files: list[str] | None = None) -> dict:
    """What a reader of the ONNX file needs: model name (preprocessing), config and calibration file names (so an
    evaluation leaves the calibration images out), points."""
    return {"vitq_version": __version__, "model_name": qmodel.model_name, "family": qmodel.family,
            "config": qmodel.config.model_dump(mode="json"), "calibration_files": calibration_files,
            "points": [asdict(p) for p in points]}


def export_onnx(qmodel: QuantizedModel, path: str | Path, *, image_size: tuple[int, int] | None = None,
                opset: int = DEFAULT_OPSET, calibration_files: list[str] | None = None,
                signed_activations: bool = False) -> OnnxExport:
    """Write ``qmodel`` to ``path`` as ONNX (input ``image`` [batch, 3, H, W], output ``logits``).

    The batch dimension is dynamic. Returns the per-slot report; the same report, the model name, the
    quantization config and ``calibration_files`` (the names of the calibration images, when known) are stored
    in the file's metadata (key ``vitq``). The file is written whole or not at all. ``signed_activations``:
    store activations with signed codes as int8 (default uint8, see the module notes).
    """
    import onnx

    path = Path(path)
    if model_device(qmodel).type != "cpu":  # traced on the CPU (the QDQ constants are numpy arrays): a CPU copy
        qmodel = copy.deepcopy(qmodel).to("cpu")
    if image_size is None:
        image_size = expected_image_size(qmodel.model) or \
            tuple(qmodel.model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
    example = torch.zeros(1, 3, *image_size)
    qmodel.eval()
    # float paths of log quantizers use exp2 and ldexp, which have no ONNX op: 2^x = Pow(2, x) and
    # ldexp(x, e) = x·2^e (exact for integer exponents)
    def pow2(g, x):
        return g.op("Pow", g.op("Constant", value_t=torch.tensor(2.0)), x)

    torch.onnx.register_custom_op_symbolic("aten::exp2", pow2, opset)
    torch.onnx.register_custom_op_symbolic("aten::ldexp", lambda g, x, e: g.op("Mul", x, pow2(g, e)), opset)
    with _export_mode(qmodel, signed_activations) as points, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        buffer = io.BytesIO()
        try:
            torch.onnx.export(qmodel, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except torch.onnx.errors.OnnxExporterError as err:  # the message's last line is the error itself
            raise VitqError(f"ONNX export failed: {str(err).splitlines()[-1]}") from None
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(export_header(qmodel, points, calibration_files))})
    with atomic_file(path) as partial:
        onnx.save(model, str(partial))
    return OnnxExport(path, points)


__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "OnnxExport", "PointExport", "export_onnx",
           "constant_tensors", "graph_consumers"]
