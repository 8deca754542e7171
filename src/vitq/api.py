"""The public Python API: ``prepare``, ``quantize``, ``evaluate`` (re-exported), ``save``/``load``.

    import vitq
    model = vitq.create_model("deit_tiny_patch16_224", checkpoint="deit_tiny.safetensors")
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="percentile", w_bits=4, a_bits=4), calib)
    print(vitq.evaluate(qmodel, (images, labels)).top1)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from vitq.calib.recon import reconstruct_model
from vitq.checks import check_calibrated, check_images, expected_image_size
from vitq.config import QuantConfig
from vitq.data import load_tensors
from vitq.device import model_device, to_device
from vitq.errors import VitqError
from vitq.methods import Method, method_class, method_names
from vitq.models import adapter_for
from vitq.models.rotation import rotate_vit
from vitq.nn.outliers import attach_outlier_splits
from vitq.quantized_model import QuantizedModel
from vitq.quantizers import build_quantizer


def model_name_of(model: nn.Module) -> str:
    """The timm architecture name of ``model`` (needed to rebuild it when loading)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ValueError("cannot tell the timm architecture of this model; pass model_name=")
    return name


def prepare(model: nn.Module, config: QuantConfig, *, model_name: str | None = None,
            inplace: bool = False, device: str | torch.device | None = None) -> QuantizedModel:
    """Wrap ``model`` and build (uncalibrated) quantizers as the method and overrides say. ``device``
    (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see :func:`vitq.device.resolve_device`): where the quantized model
    lives; ``None`` keeps the device of ``model``'s parameters."""
    return _prepare(model, config, method_class(config.method)(config), model_name, inplace, device)


def _prepare(model: nn.Module, config: QuantConfig, method: Method, model_name: str | None,
             inplace: bool, device: str | torch.device | None = None) -> QuantizedModel:
    model_name = model_name or model_name_of(model)
    if not inplace:
        model = copy.deepcopy(model)
    target = to_device(model, device)
    adapter = adapter_for(model)
    if config.rotate:
        if adapter.family != "vit":
            raise VitqError(f"rotation (--rotate) is implemented for ViT/DeiT, not the {adapter.family} family")
        rotate_vit(model, seed=config.seed)
    method.restructure(model)
    adapter.wrap(model)
    qmodel = QuantizedModel(model.eval(), model_name, adapter.family, config)
    slots = qmodel.slots()
    for override in config.overrides:  # a typo would leave quantized a layer the user believes float
        if not any(override.matches(slot.point, slot.name) for slot in slots):
            raise VitqError(f"override {override.pattern!r} matches no quantizer slot of {model_name} (slots look "
                            f"like {slots[0].point} or {slots[0].name}; 'vitq inspect' lists them)")
    for slot in slots:
        weight_only_float = config.weight_only and slot.role != "weight"
        spec = config.spec_for(slot.point, slot.name, None if weight_only_float else method.slot_spec(slot))
        slot.quantizer = None if spec is None else build_quantizer(spec)
    if config.outliers is not None:
        if not method.splits_outliers:
            raise VitqError(f"method {config.method!r} does not take outlier splitting (its calibration rewrites the "
                            f"layers it would split); use "
                            + " or ".join(n for n in method_names() if method_class(n).splits_outliers))
        if not attach_outlier_splits(qmodel, config.outliers.top_k, config.outliers.threshold,
                                     config.outliers.roles):
            raise VitqError(f"outlier splitting: no quantized Linear input has a role of "
                            f"{', '.join(config.outliers.roles)}")
    qmodel.model.to(target)  # empty quantizer buffers and modules added by the wrapping follow the model
    return qmodel


def quantize(model: nn.Module, config: QuantConfig, calib_data, *, model_name: str | None = None,
             inplace: bool = False, progress: bool = True,
             recon_checkpoint: str | Path | None = None,
             device: str | torch.device | None = None) -> QuantizedModel:
    """Quantize ``model`` with ``config.method``, calibrated on ``calib_data``, then block-reconstructed on the
    same images when the method asks for it (``config.reconstruct``, see :mod:`vitq.calib.recon`).

    ``calib_data`` is an image tensor ``[N, 3, H, W]`` (already preprocessed) or a dataset of
    ``(image, label)`` pairs. The input model is left untouched unless ``inplace``. ``recon_checkpoint``: a
    folder where the reconstruction saves its progress after every block and from which a rerun resumes.
    ``device``: where the model is quantized and lives (``None``: the device of ``model``'s parameters); the
    calibration images are moved there.
    """
    method = method_class(config.method)(config)
    if not isinstance(calib_data, torch.Tensor):
        calib_data, _ = load_tensors(calib_data, progress=progress, desc="loading calibration images")
    calib_data = check_images(calib_data, "calibration images", expected_image_size(model))
    reconstruction = method.reconstruction()  # its settings checked before any work
    qmodel = _prepare(model, config, method, model_name, inplace, device)
    calib_data = calib_data.to(model_device(qmodel.model))
    torch.manual_seed(config.seed)
    method.calibrate(qmodel, calib_data, progress=progress)
    check_calibrated(qmodel.eval(), calib_data)
    if reconstruction is not None:
        reconstruct_model(qmodel, calib_data, reconstruction, seed=config.seed, checkpoint_dir=recon_checkpoint,
                          progress=progress)
        check_calibrated(qmodel.eval(), calib_data)
    return qmodel.eval()
