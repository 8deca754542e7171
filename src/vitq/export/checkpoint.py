"""Save and load quantized models as safetensors + a JSON header.

The file holds the wrapped model's ``state_dict`` (timm keys plus every quantizer's buffers) and,
in the safetensors metadata, a JSON header with the format version, vitq version, model name and
family, the ``QuantConfig`` and the spec of every quantizer slot. Loading rebuilds the
architecture from timm (no download), rebuilds each quantizer from its spec and loads the tensors
strictly, so the reloaded model's logits are bit-identical. Nothing is ever unpickled.

Packed (the default): every quantized weight is stored as its integer codes at the real bit width
(:mod:`vitq.export.packing`, key ``<name>.weight.packed``, the header's ``packed`` entry gives bits,
``q_min``, shape and dtype) instead of a float tensor; its quantizer's scales and zero points stay in the
file as float32 (fp16 would change the dequantized values, and they are a few kB). Loading dequantizes
the codes with the weight's own quantizer; since fake-quant is idempotent on grid values, the reloaded
model computes exactly what the fake-quant model computed. The original float weights are not kept
(``packed=False`` keeps them, e.g. to re-calibrate later).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from vitq.checks import expected_image_size
from vitq.config import QuantConfig, make
from vitq.device import resolve_device
from vitq.errors import VitqError
from vitq.export.packing import pack_codes, unpack_codes
from vitq.export.validate import (
    PACKED_SUFFIX,
    PACKED_WEIGHT_DTYPES,
    check_tensor_table,
    check_tensors,
    packed_bits,
    tensor_table,
)
from vitq.files import write_safetensors
from vitq.methods import method_class
from vitq.models import adapter_by_family
from vitq.models.registry import check_model_name, create_architecture
from vitq.models.rotation import rotate_vit
from vitq.models.weights import load_state, read_state_file
from vitq.nn.outliers import attach_outlier_splits
from vitq.quantized_model import QuantizedModel
from vitq.quantizers import Quantizer, build_quantizer
from vitq.version import __version__

FORMAT = "vitq-fakequant"
FORMAT_VERSION = 2  # 2: packed weights
HEADER_KEY = "vitq"


def save(qmodel: QuantizedModel, path: str | Path, *, packed: bool = True) -> Path:
    """Write ``qmodel`` to ``path`` (``.safetensors``); ``packed``: quantized weights as bit-packed codes."""
    # the one move to the CPU of everything saved (a no-op for a CPU model); the codes are computed on the
    # model's device and moved with the rest
    state = {k: v.detach().to("cpu").contiguous() for k, v in qmodel.model.state_dict().items()}
    packed_entries = _pack_weights(qmodel, state) if packed else {}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vitq_version": __version__,
        "model_name": qmodel.model_name,
        "family": qmodel.family,
        "config": qmodel.config.model_dump(mode="json"),
        "quantizers": qmodel.quant_specs(),
        "packed": packed_entries,
    }
    return write_safetensors(path, state, {HEADER_KEY: json.dumps(header)})


def _packable(point) -> bool:
    """A calibrated integer weight quantizer, and no outlier split (whose float weight columns codes would lose)."""
    quantizer = getattr(point, "weight_quantizer", None)
    return quantizer is not None and quantizer.is_calibrated and hasattr(quantizer, "q_min") \
        and getattr(point, "outlier_split", None) is None


@torch.no_grad()
def _pack_weights(qmodel: QuantizedModel, state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Replace each quantized weight in ``state`` by its packed codes; return the header entries."""
    entries = {}
    for name, point in qmodel.points().items():
        if not _packable(point):
            continue
        quantizer, weight = point.weight_quantizer, point.weight.detach()
        bits = packed_bits(quantizer)
        codes = (quantizer.int_repr(weight) - quantizer.q_min).to("cpu")
        key = f"{name}.weight"
        del state[key]
        state[key + PACKED_SUFFIX] = pack_codes(codes, bits)
        entries[key] = {"bits": bits, "q_min": quantizer.q_min, "shape": list(weight.shape),
                        "dtype": str(weight.dtype).removeprefix("torch.")}
    return entries


def read_header(path: str | Path) -> dict:
    """The JSON header of a vitq checkpoint (raises :class:`VitqError` for anything else)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise VitqError(f"quantized model not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise VitqError(f"cannot read {path} as safetensors: {err}") from None
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, json.JSONDecodeError):
        raise VitqError(f"{path} is not a vitq quantized model (no valid '{HEADER_KEY}' header)") from None
    if not isinstance(header, dict):
        raise VitqError(f"{path} is not a vitq quantized model (its '{HEADER_KEY}' header is not an object)")
    if header.get("format") != FORMAT or header.get("format_version", 0) > FORMAT_VERSION:
        raise VitqError(f"{path} has an unsupported format {header.get('format')!r} "
                        f"version {header.get('format_version')!r}")
    return header


def _header_fields(path: Path, header: dict) -> tuple[str, str, dict, dict]:
    fields = {"model_name": str, "family": str, "config": dict, "quantizers": dict}
    for key, kind in fields.items():
        if not isinstance(header.get(key), kind):
            raise VitqError(f"{path} has a broken vitq header: '{key}' is missing or not a {kind.__name__}")
    return header["model_name"], header["family"], header["config"], header["quantizers"]


def load(path: str | Path, device: str | torch.device | None = None) -> QuantizedModel:
    """Rebuild a quantized model saved by :func:`save`, on ``device`` (``None``: the CPU).

    Everything read is validated first (:mod:`vitq.export.validate`): the header, then the tensor table against
    the architecture built on the meta device and the quantizer specs, then the data (finite, positive steps);
    only then is the model built and loaded, so a bad file costs no more than reading it. The model is built
    and loaded on the CPU and moved to ``device`` last, once everything has passed."""
    path = Path(path)
    target = None if device is None else resolve_device(device)  # an unusable device fails before any reading
    header = read_header(path)
    name, family, config, specs = _header_fields(path, header)
    packed = header.get("packed", {})
    try:
        check_model_name(name)
        adapter = adapter_by_family(family)
        qconfig = make(QuantConfig, **config)
        method_class(qconfig.method)  # a method this vitq knows
        if not isinstance(packed, dict):
            raise VitqError("broken vitq header: 'packed' is not an object")
        quantizers = {}
        for slot_name, spec in specs.items():
            if spec is not None and not isinstance(spec, dict):
                raise VitqError(f"bad quantizer spec for {slot_name}: {spec!r}")
            quantizers[slot_name] = None if spec is None else build_quantizer(spec)
        skeleton = _skeleton(create_architecture(name, device="meta"), name, family, adapter, qconfig, quantizers)
        try:
            check_tensor_table(tensor_table(path), skeleton, quantizers, packed, _image_size(skeleton.model))
        except VitqError as err:
            raise VitqError(f"does not match {name} and its header: {err}") from None
        state = read_state_file(path)
        check_tensors(state, quantizers)
        qmodel = _skeleton(create_architecture(name), name, family, adapter, qconfig, quantizers)
        _add_folded_biases(qmodel, state)
        _unpack_weights(qmodel, state, packed)
    except VitqError as err:
        raise VitqError(f"{path}: {err}") from None
    load_state(qmodel.model, state, path, what=f"quantized {name}")
    if target is not None:
        qmodel.model.to(target)
    return qmodel.eval()


def _skeleton(model: nn.Module, name: str, family: str, adapter, config: QuantConfig,
              quantizers: dict[str, Quantizer | None]) -> QuantizedModel:
    """``model`` wrapped by its family's adapter, each slot given its quantizer from the header. A slot missing
    from the header is float only for pre-LayerNorm points (files from before those points existed)."""
    if not adapter.matches(model):
        raise VitqError(f"saved as a {family} model, but {name} is not one")
    if config.rotate:  # the rotated structure (RMSNorm without affine, folded biases); the weights come from the file
        rotate_vit(model, seed=config.seed)
    method_class(config.method)(config).restructure(model)  # the method's own changes (APHQ-ViT's ReLU MLPs)
    adapter.wrap(model)
    qmodel = QuantizedModel(model.eval(), name, family, config)
    slots = qmodel.slots()
    extra = set(quantizers) - {slot.name for slot in slots}
    if extra:
        raise VitqError(f"does not match {name}: {len(extra)} unknown quantizer slot(s), e.g. {min(extra)}")
    for slot in slots:
        if slot.name not in quantizers and slot.role != "pre_ln":
            raise VitqError(f"does not match {name}: no entry for {slot.name}")
        slot.quantizer = quantizers.get(slot.name)
    if config.outliers is not None:
        attach_outlier_splits(qmodel, config.outliers.top_k, config.outliers.threshold, config.outliers.roles)
    return qmodel


def _image_size(model: nn.Module) -> tuple[int, int]:
    """The image size to trace ``model`` at: the one its patch embedding insists on, else its pretrained one."""
    return expected_image_size(model) or tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])


@torch.no_grad()
def _unpack_weights(qmodel: QuantizedModel, state: dict[str, torch.Tensor], entries: dict) -> None:
    """Turn the packed codes in ``state`` back into float weights, dequantized by their own quantizers (the
    entries were validated against the codes and quantizers by :func:`~vitq.export.validate.check_tensor_table`)."""
    points = qmodel.points()
    for key, entry in entries.items():
        quantizer = points[key.removesuffix(".weight")].weight_quantizer
        prefix = key.removesuffix("weight") + "weight_quantizer."
        quantizer.set_params({p: state[prefix + p] for p in quantizer.param_names})
        codes = unpack_codes(state.pop(key + PACKED_SUFFIX), entry["bits"], math.prod(entry["shape"])) + entry["q_min"]
        state[key] = quantizer.dequantize(codes.reshape(entry["shape"])).to(PACKED_WEIGHT_DTYPES[entry["dtype"]])


def _add_folded_biases(qmodel: QuantizedModel, state: dict[str, torch.Tensor]) -> None:
    """Give a bias to every point that has none in timm but one in the file's ``state``.

    Reparameterizations fold a shift into the next layer's bias (RepQ-ViT, docs/methods/repq-vit.md), which creates
    one where timm has none (Swin's ``downsample.reduction``).
    """
    for name, point in qmodel.points().items():
        weight = getattr(point, "weight", None)
        if weight is not None and getattr(point, "bias", "absent") is None and f"{name}.bias" in state:
            point.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype))
