"""vitq: post-training quantization of Vision Transformers.

    import vitq
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="percentile", w_bits=4, a_bits=4), calib_images)
    result = vitq.evaluate(qmodel, (images, labels))
    vitq.save(qmodel, "deit_tiny_w4a4.safetensors"); qmodel = vitq.load("deit_tiny_w4a4.safetensors")
"""

__version__ = "0.1.0"

from vitq import methods, models, quantizers  # noqa: E402,F401  (register methods, families, kinds)
from vitq.api import prepare, quantize  # noqa: E402
from vitq.config import PointOverride, QuantConfig  # noqa: E402
from vitq.errors import VitqError  # noqa: E402
from vitq.eval.accuracy import EvalResult, evaluate  # noqa: E402
from vitq.export.checkpoint import load, save  # noqa: E402
from vitq.models import create_model  # noqa: E402
from vitq.quantized_model import QuantizedModel  # noqa: E402

__all__ = ["EvalResult", "PointOverride", "QuantConfig", "QuantizedModel", "VitqError", "__version__",
           "create_model", "evaluate", "load", "prepare", "quantize", "save"]
