"""Checks at the boundaries of the library: what comes in (checkpoints, images, labels) and what a calibration
produced (quantizer parameters, logits) must be finite and well-formed, or a one-line :class:`VitqError` names
the first bad tensor. A NaN weight or image otherwise flows through to an argmax over NaN rows and a "top-1"
that is just the share of class-0 images.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vitq.errors import VitqError

#: calibration images whose logits are checked after calibration (a forward pass of the quantized model)
LOGIT_CHECK_IMAGES = 8


def nonfinite(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN or infinite (0 for integer and bool tensors)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int((~torch.isfinite(tensor.detach())).sum())


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise naming the first of ``tensors`` (in order) with a NaN or infinite entry; ``what`` says whose."""
    for name, tensor in tensors.items():
        bad = nonfinite(tensor)
        if bad:
            raise VitqError(f"{what}: {name} has {bad} NaN or infinite value(s) of {tensor.numel()}")


def expected_image_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The ``(H, W)`` a timm model (or a :class:`~vitq.QuantizedModel` of one) insists on, ``None`` when it takes
    any size (or cannot tell)."""
    embed = getattr(getattr(model, "model", model), "patch_embed", None)
    if embed is None or not getattr(embed, "strict_img_size", False):
        return None
    return tuple(embed.img_size)


def check_images(images: object, what: str = "calibration images",
                 size: tuple[int, int] | None = None) -> torch.Tensor:
    """``images`` as a finite float32 ``[N, 3, H, W]`` tensor with ``N >= 1`` (float64/float16 are cast);
    ``size``: the ``(H, W)`` the model expects."""
    if not isinstance(images, torch.Tensor):
        raise VitqError(f"{what} must be a tensor [N, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise VitqError(f"{what} must be a tensor [N, 3, H, W], got shape {list(images.shape)}")
    if len(images) == 0:
        raise VitqError(f"{what} are empty (shape {list(images.shape)})")
    if not images.is_floating_point():
        raise VitqError(f"{what} must be preprocessed float images, got dtype {images.dtype}")
    if size is not None and tuple(images.shape[2:]) != tuple(size):
        raise VitqError(f"{what} are {images.shape[2]}x{images.shape[3]} px but the model expects "
                        f"{size[0]}x{size[1]} (preprocess with vitq.data.transform_for_model)")
    images = images.float()
    check_finite({"the image tensor": images}, what)
    return images


def check_labels(labels: object, n_images: int, n_classes: int | None) -> torch.Tensor:
    """``labels`` as an int64 ``[n_images]`` tensor of class indices in ``[0, n_classes)``."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or len(labels) != n_images:
        shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise VitqError(f"labels must be a 1-d tensor of {n_images} class indices (one per image), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise VitqError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.to(torch.int64)
    if n_classes is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise VitqError(f"labels must be class indices in [0, {n_classes}), got [{int(labels.min())}, "
                        f"{int(labels.max())}]")
    return labels


def check_logits(logits: torch.Tensor, what: str) -> None:
    """Raise when a model's logits hold NaN or infinite values (a broken model, never a real prediction)."""
    bad = nonfinite(logits)
    if bad:
        rows = int((~torch.isfinite(logits)).any(dim=-1).sum())
        raise VitqError(f"{what} produced NaN or infinite logits for {rows} of {len(logits)} images")


@torch.no_grad()
def check_calibrated(qmodel, images: torch.Tensor) -> None:
    """After calibration: every quantizer parameter finite (the error names the first bad slot), and the
    quantized model's logits on the first :data:`LOGIT_CHECK_IMAGES` calibration images finite."""
    for slot in qmodel.slots():
        quantizer = slot.quantizer
        if quantizer is not None and quantizer.is_calibrated:
            check_finite({f"{slot.name}.{name}": getattr(quantizer, name) for name in quantizer.param_names},
                         "calibration gave a broken quantizer")
    check_logits(qmodel(images[:LOGIT_CHECK_IMAGES]), f"the calibrated {qmodel.config.label} model")
