"""vitq: post-training quantization of Vision Transformers.

    import vitq
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="percentile", w_bits=4, a_bits=4), calib_images)
    result = vitq.evaluate(qmodel, (images, labels))
    vitq.save(qmodel, "deit_tiny_w4a4.safetensors"); qmodel = vitq.load("deit_tiny_w4a4.safetensors")

The public names load on first use, so importing a submodule (``vitq.config``, ``vitq.quantizers``) does not
import the whole method zoo; ``vitq.quantize`` and friends register every method, model family and quantizer kind.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vitq.version import __version__

#: public name -> the module that defines it
_PUBLIC = {
    "EvalResult": "vitq.eval.accuracy",
    "PointOverride": "vitq.config",
    "QuantConfig": "vitq.config",
    "QuantizedModel": "vitq.quantized_model",
    "VitqError": "vitq.errors",
    "create_model": "vitq.models",
    "evaluate": "vitq.eval.accuracy",
    "load": "vitq.export.checkpoint",
    "prepare": "vitq.api",
    "quantize": "vitq.api",
    "save": "vitq.export.checkpoint",
}

__all__ = ["EvalResult", "PointOverride", "QuantConfig", "QuantizedModel", "VitqError", "__version__",
           "create_model", "evaluate", "load", "prepare", "quantize", "save"]

if TYPE_CHECKING:
    from vitq.api import prepare, quantize
    from vitq.config import PointOverride, QuantConfig
    from vitq.errors import VitqError
    from vitq.eval.accuracy import EvalResult, evaluate
    from vitq.export.checkpoint import load, save
    from vitq.models import create_model
    from vitq.quantized_model import QuantizedModel


def __getattr__(name: str) -> Any:
    """Load a public name (and, through :mod:`vitq.api`, every registry) on first use."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vitq' has no attribute {name!r}")
    importlib.import_module("vitq.api")  # registers the methods, model families and quantizer kinds
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
