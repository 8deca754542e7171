"""onnxruntime's integer GEMMs on x86 CPUs without VNNI, and the weight form they compute exactly there.

Without int8 dot-product instructions (AVX-VNNI, AVX512-VNNI, AMX), onnxruntime's u8·s8 GEMMs multiply with
``vpmaddubsw``, which adds each pair of u8·s8 products in int16 and clips the sum (255·127·2 > 32767): an int8
model then computes wrong logits. Its u8·u8 GEMMs widen both operands to int16 first and never clip, so the same
weights stored as uint8 (codes and zero point moved by +128) compute the model exactly on every CPU.
:func:`vitq.eval.ort.open_session` applies :func:`unsigned_weight_codes` where :func:`int8_gemm_saturates`.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from vitq.export.onnx import constant_tensors, graph_consumers

#: ops whose constant operand may be int8 weight codes: input indices of (activation, weight, weight zero point);
#: a ``DequantizeLinear`` has no activation of its own (its consumers' other input is one)
WEIGHT_INPUTS = {"DequantizeLinear": (None, 0, 2), "MatMulInteger": (0, 1, 3), "MatMulIntegerToFloat": (0, 1, 5),
                 "ConvInteger": (0, 1, 3), "QLinearMatMul": (0, 3, 5), "QLinearConv": (0, 3, 5)}

#: where Linux lists the CPU's instruction-set flags
CPUINFO = Path("/proc/cpuinfo")

#: ops that move elements without changing their type (the first input's)
LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Split", "Slice", "Gather", "Concat",
              "Identity", "Expand"}


def int8_gemm_saturates() -> bool:
    """Whether onnxruntime's u8·s8 integer GEMMs may saturate on this CPU: x86 without int8 dot-product
    instructions (AVX-VNNI, AVX512-VNNI, AMX) adds pairs of u8·s8 products in int16 (``vpmaddubsw``), which
    clips when both codes are large (255·127·2 > 32767). An x86 CPU whose flags cannot be read counts as one; other
    architectures do not (ARM's dot products accumulate in int32)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return True
    return not any(flag in flags for flag in ("avx_vnni", "avx512_vnni", "amx_int8"))


def unsigned_weight_codes(graph) -> int:
    """Store the constant int8 weights of the ONNX ``graph`` that meet a uint8 activation as uint8 (codes + 128,
    zero point + 128): the same numbers, computed by onnxruntime's u8·u8 GEMMs, which widen to int16 before
    multiplying and so never saturate (see :func:`int8_gemm_saturates`); on AVX2 they take about 1.5x the u8·s8
    time. A weight meets a uint8 activation in an integer op of :data:`WEIGHT_INPUTS`, or, dequantized, in a
    float op whose other input is a dequantized uint8 tensor (the pair onnxruntime fuses). Returns the number of
    weights changed."""
    from onnx import TensorProto, numpy_helper

    constants = constant_tensors(graph)
    producers = {output: node for node in graph.node for output in node.output}
    consumers = graph_consumers(graph)
    uint8_values = {value.name for value in graph.input if value.type.tensor_type.elem_type == TensorProto.UINT8}
    uint8_values |= {name for name, tensor in constants.items() if tensor.data_type == TensorProto.UINT8}
    for node in graph.node:  # in topological order, as ONNX stores it
        if node.op_type == "DynamicQuantizeLinear" or (
                node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in uint8_values) or (
                node.op_type in LAYOUT_OPS and node.input[0] in uint8_values):
            uint8_values.update(node.output)

    def dequantized_uint8(name: str) -> bool:
        producer = producers.get(name)
        return producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in uint8_values

    def meets_uint8(node, activation: int | None) -> bool:
        if activation is not None:
            return node.input[activation] in uint8_values
        users = consumers.get(node.output[0], [])
        return bool(users) and all(any(dequantized_uint8(other) for other in user.input if other != node.output[0])
                                   for user in users)

    renamed: dict[str, str] = {}
    weights = set()
    for node in graph.node:
        if node.op_type not in WEIGHT_INPUTS:
            continue
        activation, weight, zero = WEIGHT_INPUTS[node.op_type]
        if len(node.input) <= zero or not meets_uint8(node, activation):
            continue
        tensors = {index: constants.get(node.input[index]) for index in (weight, zero)}
        if any(tensor is None or tensor.data_type != TensorProto.INT8 for tensor in tensors.values()):
            continue
        weights.add(node.input[weight])
        for index, tensor in tensors.items():
            name = node.input[index]
            if name not in renamed:
                renamed[name] = f"{name}_uint8"
                shifted = (numpy_helper.to_array(tensor).astype(np.int16) + 128).astype(np.uint8)
                graph.initializer.append(numpy_helper.from_array(shifted, renamed[name]))
            node.input[index] = renamed[name]
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name in renamed and init.name not in used]:
        graph.initializer.remove(init)
    return len(weights)


__all__ = ["int8_gemm_saturates", "unsigned_weight_codes"]
