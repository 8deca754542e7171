"""Explicit multi-head attention with quantization points on q, k, v and the softmax output.

timm's ``Attention`` uses ``F.scaled_dot_product_attention`` when fused attention is enabled,
which silently bypasses any quantizer placed on the attention map. These modules always compute
``softmax(q kᵀ · scale + bias) v`` step by step, with the same attribute names as timm so the
checkpoint keys do not change (EfficientViT MIT's ReLU linear attention, :class:`QuantLiteMLA`, has no
softmax). One module per attention family; all are re-exported here.
"""

from vitq.nn.attention.base import QuantAttention, QuantAttentionBase, merged_qkv, stacked_linear
from vitq.nn.attention.beit import QuantRelPosAttention
from vitq.nn.attention.cait import QuantClassAttention, QuantTalkingHeadAttention
from vitq.nn.attention.convit import QuantGatedPositionalAttention
from vitq.nn.attention.efficientvit_mit import QuantLiteMLA
from vitq.nn.attention.efficientvit_msra import QuantCascadedGroupAttention, QuantCascadedHead
from vitq.nn.attention.eva import QuantEvaAttention
from vitq.nn.attention.levit import QuantLevitAttention, QuantLevitAttentionDownsample
from vitq.nn.attention.mobilevit import QuantLinearSelfAttention
from vitq.nn.attention.swin import QuantCosineWindowAttention, QuantWindowAttention
from vitq.nn.attention.tinyvit import QuantTinyVitAttention
from vitq.nn.attention.xcit import QuantXCAttention

__all__ = ["QuantAttention", "QuantAttentionBase", "QuantCascadedGroupAttention", "QuantCascadedHead",
           "QuantClassAttention",
           "QuantCosineWindowAttention", "QuantEvaAttention", "QuantGatedPositionalAttention",
           "QuantLevitAttention", "QuantLevitAttentionDownsample", "QuantLinearSelfAttention", "QuantLiteMLA",
           "QuantRelPosAttention", "QuantTalkingHeadAttention", "QuantTinyVitAttention", "QuantWindowAttention",
           "QuantXCAttention", "merged_qkv", "stacked_linear"]
