"""The validation layer of a saved model: everything read from the file is cross-checked before it is used.

Before anything is allocated, the file's tensor table (names, shapes and dtypes, read without the data) is
checked against the architecture built on the ``meta`` device (shapes only) and against the header's quantizer
specs and packed entries:

- every tensor the architecture needs is there, nothing else is, and each has the architecture's shape;
- each quantizer's parameters have exactly the shapes that calibrating its spec on that slot's input gives (so
  a shrunk, transposed or foreign scale tensor is refused, never broadcast into a different model);
- each packed weight's entry agrees with its quantizer (bit width, lowest code), with the weight's shape and
  with the size of its ``uint8`` codes, and names a float dtype of the allow-list;
- every dtype is on the allow-list (:data:`FILE_DTYPES`).

Then, once the data is read, every tensor must be finite and every step-like parameter positive
(:data:`POSITIVE_PARAMS`). A 3 MB file that names a large architecture is thus refused without building it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from vitq.checks import check_finite
from vitq.errors import VitqError
from vitq.export.packing import packed_size
from vitq.quantized_model import QuantizedModel
from vitq.quantizers import Quantizer, build_quantizer

#: the dtypes a saved model's tensors may have (safetensors' names)
FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
               "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
#: the dtypes a packed weight may be restored to (the header's ``dtype`` entry)
PACKED_WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: parameters that are steps or clipping bounds: they must be > 0
POSITIVE_PARAMS = ("scale", "log_step", "pos_step", "clip")
PACKED_SUFFIX = ".packed"

Shape = tuple[int, ...]


def tensor_table(path) -> dict[str, tuple[Shape, str]]:
    """Name -> (shape, safetensors dtype) of every tensor in ``path``, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}  # noqa: SIM118


def packed_bits(quantizer: Quantizer) -> int:
    """The bit width its codes are packed at: enough for ``q_max − q_min``."""
    return max(1, (quantizer.q_max - quantizer.q_min).bit_length())


@torch.no_grad()
def slot_input_shapes(skeleton: QuantizedModel, quantizers: Mapping[str, Quantizer | None],
                      image_size: tuple[int, int]) -> dict[str, Shape]:
    """The input shape of every quantized slot for one image, from a forward pass on the meta device with
    stand-in quantizers that only record their input."""
    shapes: dict[str, Shape] = {}
    hooks = []
    for slot in skeleton.slots():
        if quantizers.get(slot.name) is None:
            slot.quantizer = None
            continue
        stand_in = build_quantizer(quantizers[slot.name].spec())
        stand_in.enabled = False
        hooks.append(stand_in.register_forward_pre_hook(
            lambda _module, args, name=slot.name: shapes.__setitem__(name, tuple(args[0].shape))))
        slot.quantizer = stand_in
    try:
        skeleton(torch.zeros(1, 3, *image_size, device="meta"))
    except Exception as err:  # an architecture that cannot run shapes-only: report, never guess
        raise VitqError(f"cannot trace {skeleton.model_name} on the meta device ({type(err).__name__}: {err})") \
            from None
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def expected_param_shapes(quantizer: Quantizer, input_shape: Shape,
                          cache: dict[tuple[str, Shape], dict[str, tuple[Shape, torch.dtype]]]) -> \
        dict[str, tuple[Shape, torch.dtype]]:
    """Shape and dtype of each parameter of ``quantizer`` after calibrating on an input of ``input_shape``:
    what a fresh twin calibrated on random data of that shape gets (memoized per spec and shape)."""
    key = (json.dumps(quantizer.spec(), sort_keys=True), input_shape)
    if key not in cache:
        twin = build_quantizer(quantizer.spec())
        twin.calibrate(torch.rand(input_shape, generator=torch.Generator().manual_seed(0)))
        cache[key] = {name: (tuple(getattr(twin, name).shape), getattr(twin, name).dtype)
                      for name in twin.param_names}
    return cache[key]


def check_tensor_table(table: Mapping[str, tuple[Shape, str]], skeleton: QuantizedModel,
                       quantizers: Mapping[str, Quantizer | None], packed: Mapping[str, object],
                       image_size: tuple[int, int]) -> None:
    """Cross-check the file's tensor table with the meta ``skeleton`` (its slots hold the ``quantizers`` built from
    the header's specs, still uncalibrated) and the header's ``packed`` entries (see the module docstring).

    Model tensors must have the architecture's shape and a dtype of the same kind (float or integer); quantizer
    parameters and packed codes their exact shape and dtype."""
    for key, (_, dtype) in table.items():
        if dtype not in FILE_DTYPES:
            raise VitqError(f"tensor {key} has dtype {dtype}, not one of {', '.join(FILE_DTYPES)}")
    points = skeleton.points()
    # (shape, dtype, exact dtype?) of every tensor the file must hold; the quantizers' (still empty) parameters
    # get the shapes a calibration gives below
    expected = {key: (tuple(t.shape), t.dtype, False) for key, t in skeleton.model.state_dict().items()}
    for name, point in points.items():  # RepQ-ViT's fold may give a bias to a layer that has none in timm
        weight = getattr(point, "weight", None)
        if weight is not None and getattr(point, "bias", "absent") is None and f"{name}.bias" in table:
            expected[f"{name}.bias"] = ((weight.shape[0],), weight.dtype, False)
    for key, entry in packed.items():
        _check_packed_entry(key, entry, table, expected, points, quantizers)
        expected.pop(key)
        expected[key + PACKED_SUFFIX] = ((packed_size(math.prod(entry["shape"]), entry["bits"]),), torch.uint8,
                                         True)
    shapes = slot_input_shapes(skeleton, quantizers, image_size)
    cache: dict = {}
    for slot_name, quantizer in quantizers.items():
        if quantizer is None:
            continue
        if slot_name not in shapes:
            raise VitqError(f"quantizer slot {slot_name} is never used by the architecture")
        for param, (shape, dtype) in expected_param_shapes(quantizer, shapes[slot_name], cache).items():
            expected[f"{slot_name}.{param}"] = (shape, dtype, True)
    missing = [k for k in expected if k not in table]
    if missing:
        raise VitqError(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
    unexpected = [k for k in table if k not in expected]
    if unexpected:
        raise VitqError(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
    for key, (shape, dtype, exact) in expected.items():
        got_shape, got = table[key][0], FILE_DTYPES[table[key][1]]
        if got_shape != shape:
            raise VitqError(f"tensor {key} has shape {list(got_shape)}, the model needs {list(shape)}")
        if (got != dtype) if exact else (got.is_floating_point != dtype.is_floating_point):
            raise VitqError(f"tensor {key} has dtype {table[key][1]}, the model needs {dtype}")


def _check_packed_entry(key: str, entry: object, table, expected, points, quantizers) -> None:
    """One ``packed`` header entry against its weight, its quantizer and its codes in the table."""
    point = points.get(key.removesuffix(".weight"))
    quantizer = quantizers.get(key.removesuffix("weight") + "weight_quantizer")
    if not key.endswith(".weight") or point is None or quantizer is None or not hasattr(quantizer, "q_min"):
        raise VitqError(f"packed weight {key} is not the weight of a layer with a uniform weight quantizer")
    fields = {"bits": int, "q_min": int, "shape": list, "dtype": str}
    if not isinstance(entry, dict) or any(type(entry.get(f)) is not kind for f, kind in fields.items()) \
            or not all(type(n) is int and n >= 0 for n in entry["shape"]):
        raise VitqError(f"broken 'packed' entry for {key}: {entry!r}")
    if entry["dtype"] not in PACKED_WEIGHT_DTYPES:
        raise VitqError(f"packed weight {key} has dtype {entry['dtype']!r}, not one of "
                        f"{', '.join(PACKED_WEIGHT_DTYPES)}")
    if entry["bits"] != packed_bits(quantizer) or entry["q_min"] != quantizer.q_min:
        raise VitqError(f"packed weight {key}: {entry['bits']}-bit codes from {entry['q_min']}, but its "
                        f"quantizer ({quantizer.bits}-bit) has {packed_bits(quantizer)}-bit codes from "
                        f"{quantizer.q_min}")
    if tuple(entry["shape"]) != expected[key][0]:
        raise VitqError(f"packed weight {key} has shape {entry['shape']}, the model needs {list(expected[key][0])}")
    if key in table:
        raise VitqError(f"packed weight {key} is also stored as a float tensor")


def check_tensors(state: Mapping[str, torch.Tensor], quantizers: Mapping[str, Quantizer | None]) -> None:
    """The data read: every tensor finite and every step-like quantizer parameter positive."""
    check_finite(state, "saved tensor")
    for slot_name, quantizer in quantizers.items():
        for param in (quantizer.param_names if quantizer is not None else ()):
            value = state.get(f"{slot_name}.{param}")
            if param in POSITIVE_PARAMS and value is not None and value.numel() and not bool((value > 0).all()):
                raise VitqError(f"{slot_name}.{param} must be positive, got a minimum of {float(value.min()):g}")
