"""Where a model runs: ``--device`` / ``device=`` resolved to one ``torch.device``, checked before any work.

``auto`` is the first CUDA device when torch sees one, else the CPU. Fake-quant numerics are float32 on every
device (no autocast); TF32 matmuls are left as torch's default (off for float32 matmuls), so a GPU run differs
from a CPU run only by the order of float operations.
"""

from __future__ import annotations

import re

import torch

from vitq.errors import VitqError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` of ``device``: ``auto``/``None`` (CUDA device 0 if available, else CPU), ``cpu``,
    ``cuda`` (the current CUDA device) or ``cuda:N``. A CUDA device that this machine does not have is one error
    line, not a failure deep inside the first kernel launch."""
    if isinstance(device, torch.device):
        device = str(device)
    text = "auto" if device is None else str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.match(text)
    if match is None:
        raise VitqError(f"unknown device {device!r}; expected {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise VitqError(f"device {device!r} asked for, but {why}; use --device cpu (or auto)")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise VitqError(f"device {device!r} asked for, but this machine has {count} CUDA device(s) (cuda:0.."
                        f"cuda:{count - 1})")
    return torch.device("cuda", index)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device ``model`` runs on: that of its first parameter (else its first buffer; the CPU for a model
    that holds no tensors). vitq keeps a model on one device, so the first tensor stands for all of them."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """Move ``model`` (in place) to ``device`` and return where it now is; ``None`` leaves it where it is."""
    if device is None:
        return model_device(model)
    target = resolve_device(device)
    model.to(target)
    return target
