"""Fake-quant primitives. Importing this package registers every quantizer kind."""

from vitq.quantizers.adalog import AdaLogQuantizer
from vitq.quantizers.base import Quantizer, check_bits
from vitq.quantizers.dual_uniform import DualUniformQuantizer
from vitq.quantizers.fp import (
    FloatFormatQuantizer,
    FP4E2M1Quantizer,
    FP8E4M3Quantizer,
    FP8E5M2Quantizer,
    MXFP4Quantizer,
    MXFP8Quantizer,
    NVFP4Quantizer,
)
from vitq.quantizers.log import Log2Quantizer, LogSqrt2Quantizer
from vitq.quantizers.noisy import NoisyUniformQuantizer
from vitq.quantizers.ptf import PowerOfTwoFactorQuantizer
from vitq.quantizers.registry import build_quantizer, quantizer_kinds, register_quantizer
from vitq.quantizers.sulq import ShiftUniformLog2Quantizer
from vitq.quantizers.tan import TanQuantizer
from vitq.quantizers.twin_uniform import TwinUniformGeluQuantizer, TwinUniformSoftmaxQuantizer
from vitq.quantizers.uniform import UniformQuantizer

__all__ = ["AdaLogQuantizer", "DualUniformQuantizer", "FP4E2M1Quantizer", "FP8E4M3Quantizer", "FP8E5M2Quantizer",
           "FloatFormatQuantizer", "Log2Quantizer", "LogSqrt2Quantizer", "MXFP4Quantizer", "MXFP8Quantizer",
           "NVFP4Quantizer", "NoisyUniformQuantizer", "PowerOfTwoFactorQuantizer", "Quantizer",
           "ShiftUniformLog2Quantizer", "TanQuantizer", "TwinUniformGeluQuantizer", "TwinUniformSoftmaxQuantizer",
           "UniformQuantizer", "build_quantizer", "check_bits", "quantizer_kinds", "register_quantizer"]
