"""Export for onnxruntime: our QDQ ONNX with onnxruntime's own fusions applied ahead of time, biases folded in.

:func:`vitq.export.onnx.export_onnx` writes standard ONNX (``QuantizeLinear``/``DequantizeLinear`` around plain
``MatMul``), which every runtime reads. onnxruntime fuses that graph when it loads it: each ``DQ → MatMul``
becomes an integer GEMM (``MatMulIntegerToFloat``, or ``QLinearMatMul`` between two quantized inputs), the
erf GELU with its bias becomes ``BiasGelu``, LayerNorm is its own kernel. What it does not fuse is the bias of a
Linear layer: the integer GEMM is followed by a separate ``Add`` over the whole activation.

:func:`export_onnxruntime` therefore

1. writes the QDQ ONNX,
2. lets onnxruntime optimise it at its *extended* level and save the result (its own fusions, which are not
   specific to this CPU: the hardware-specific layouts of the *all* level are left to load time),
3. folds each constant bias ``Add`` into the ``bias`` input of the ``MatMulIntegerToFloat`` that feeds it
   (:func:`fold_bias_into_integer_matmul`); the kernel adds it while the GEMM result is still in cache.

With ``packed_weights`` every Linear layer whose weights have 2 to 4 bits is written as ``MatMulNBits`` before
step 2 (:mod:`vitq.export.matmul_nbits`): the file then holds those weights packed two per byte (DeiT-tiny: 3.6
instead of 6.2 MB), and the bias is folded into that op the same way.

The file uses onnxruntime's contrib operators (domain ``com.microsoft``): onnxruntime runs it, other runtimes do
not (they take ``--format onnx``). It computes the same model as the QDQ file (the bias is added in the same
float32 arithmetic, in one step instead of two). Which graph placements are fastest was measured, and is in
``benchmarks/results/ort_graph.md``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from vitq.device import model_device
from vitq.errors import VitqError
from vitq.export import matmul_nbits
from vitq.export.onnx import (
    DEFAULT_OPSET,
    METADATA_KEY,
    OnnxExport,
    constant_tensors,
    export_header,
    export_onnx,
    graph_consumers,
)
from vitq.files import atomic_file
from vitq.quantized_model import QuantizedModel

#: the contrib GEMMs that take a bias added to their float output, and the index of that input
BIAS_INPUTS = {"MatMulIntegerToFloat": 6, matmul_nbits.OP: 5}


def _output_features(node, constants: dict[str, tuple[int, ...]]) -> int | None:
    """N of a GEMM of :data:`BIAS_INPUTS`: ``MatMulNBits``' attribute, else its constant weight's last dimension."""
    if node.op_type == matmul_nbits.OP:
        return next((attr.i for attr in node.attribute if attr.name == "N"), None)
    shape = constants.get(node.input[1], ())
    return shape[1] if len(shape) == 2 else None


def fold_bias_into_integer_matmul(graph) -> int:
    """Fold every ``Add(GEMM(...), bias)`` of the ONNX ``graph`` into the GEMM's ``bias`` input, for the GEMMs of
    :data:`BIAS_INPUTS` (``MatMulIntegerToFloat``, ``MatMulNBits``).

    Only when the GEMM's output feeds that ``Add`` alone, the GEMM has no bias yet, and the other operand is a
    constant 1-D tensor as long as the output's last dimension (the bias of a Linear layer; a residual or a
    broadcast constant is left alone). The ``Add``'s output name is kept. Returns the number of folds."""
    constants = {name: tuple(tensor.dims) for name, tensor in constant_tensors(graph).items()}
    consumers = graph_consumers(graph)
    graph_outputs = {value.name for value in graph.output}
    folded = []
    for gemm in [n for n in graph.node if n.op_type in BIAS_INPUTS]:
        users, bias_input = consumers.get(gemm.output[0], []), BIAS_INPUTS[gemm.op_type]
        if len(users) != 1 or users[0].op_type != "Add" or gemm.output[0] in graph_outputs:
            continue
        if len(gemm.input) > bias_input and gemm.input[bias_input]:
            continue
        add = users[0]
        others = [name for name in add.input if name != gemm.output[0]]
        features = _output_features(gemm, constants)
        if len(others) != 1 or features is None or constants.get(others[0]) != (features,):
            continue
        gemm.input.extend([""] * (bias_input - len(gemm.input)))
        gemm.input.append(others[0])
        gemm.output[0] = add.output[0]
        folded.append(add)
    for add in folded:
        graph.node.remove(add)
    return len(folded)


def export_onnxruntime(qmodel: QuantizedModel, path: str | Path, *, opset: int = DEFAULT_OPSET,
                       calibration_files: list[str] | None = None, packed_weights: bool = False,
                       accuracy: str = "fp32") -> OnnxExport:
    """Write ``qmodel`` to ``path`` as an onnxruntime-optimised ONNX file (see the module notes); same input,
    output, metadata and report as :func:`vitq.export.onnx.export_onnx`. The file is written whole or not at
    all.

    ``packed_weights``: the Linear layers whose weights have at most 4 bits store them packed, two per byte, and
    run as ``MatMulNBits`` (:mod:`vitq.export.matmul_nbits`), computing in ``accuracy`` (``fp32``, or ``int8``:
    the input quantized per block at run time); otherwise they are int8 codes like 8-bit weights."""
    if accuracy not in matmul_nbits.ACCURACY_LEVELS:
        raise VitqError(f"accuracy must be one of {', '.join(matmul_nbits.ACCURACY_LEVELS)}, got {accuracy!r}")
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the optimiser)
    except ImportError:
        raise VitqError("--format onnxruntime needs onnxruntime: pip install onnxruntime") from None
    from vitq.eval.ort import open_session

    path = Path(path)
    if packed_weights and model_device(qmodel).type != "cpu":  # the patched layers must be the ones traced
        qmodel = copy.deepcopy(qmodel).to("cpu")
    level = matmul_nbits.ACCURACY_LEVELS[accuracy] if packed_weights else 0
    with tempfile.TemporaryDirectory() as tmp:
        qdq, optimized = Path(tmp) / "qdq.onnx", Path(tmp) / "optimized.onnx"
        with matmul_nbits.nbits_linears(qmodel, level, enabled=packed_weights) as packed:
            exported = export_onnx(qmodel, qdq, opset=opset, calibration_files=calibration_files)
        open_session(qdq, optimization="extended", save_to=optimized)
        model = onnx.load(str(optimized))
    points = [replace(p, form=matmul_nbits.FORM) if p.slot in packed else p for p in exported.points]
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(export_header(qmodel, points, calibration_files))})
    fold_bias_into_integer_matmul(model.graph)
    with atomic_file(path) as partial:
        onnx.save(model, str(partial))
    return OnnxExport(path, points)


__all__ = ["export_onnxruntime", "fold_bias_into_integer_matmul"]
