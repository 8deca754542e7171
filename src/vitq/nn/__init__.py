"""Quantized layers: quantization points that wrap timm modules."""

from vitq.nn.attention import QuantAttention, QuantAttentionBase, QuantWindowAttention
from vitq.nn.modules import ROLES, QAct, QConv2d, QLayerNorm, QLinear, QuantPoint

__all__ = ["ROLES", "QAct", "QConv2d", "QLayerNorm", "QLinear", "QuantAttention", "QuantAttentionBase",
           "QuantPoint", "QuantWindowAttention"]
