"""Fake-quant primitives. Importing this package registers every quantizer kind."""

from vitq.quantizers.base import Quantizer, check_bits
from vitq.quantizers.registry import build_quantizer, quantizer_kinds, register_quantizer
from vitq.quantizers.uniform import UniformQuantizer

__all__ = ["Quantizer", "UniformQuantizer", "build_quantizer", "check_bits", "quantizer_kinds",
           "register_quantizer"]
