"""XCiT cross-covariance attention: the softmax runs over channels."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase
from vitq.nn.modules import QLinear


class QuantXCAttention(QuantAttentionBase):
    """Replacement for timm XCiT's ``XCA`` (cross-covariance attention): each head attends over its channels, not
    over the tokens, following timm's non-fused path step by step.

    Per head, q, k and v are [channels C', tokens N] (``qkv`` split as timm does). q and k are L2-normalised over the
    tokens, the scores are the [C' × C'] cross-covariance ``Q(q̂)·Q(k̂)ᵀ`` times the learned per-head
    ``temperature``, and ``softmax(·) → Q → @ Q(v)`` mixes the channels of v ([C', N]). The ``q`` and ``k`` points see
    the normalised q and k, the operands of the product (``scale`` is 1); the temperature multiplies the product after
    it, in float, as Swin v2's logit scale does, so the float output is timm's exactly. The ``softmax`` point quantizes
    the channel-attention map (rows sum to 1 over the key channels) that multiplies v.

    The attention output is [B, heads, C', N] (channels before tokens, :attr:`attends_over_channels`), merged into
    ``proj``'s input [B, N, heads·C'] as timm does. Keeps timm's attribute names (``temperature``, ``qkv``, ``proj``),
    so the ``state_dict`` keys are unchanged.
    """

    #: the attention output ``value_weights(A) @ v`` is [B, heads, channels, tokens], the transpose of the usual
    #: [B, heads, tokens, channels] layout of ``proj``'s input split into heads
    attends_over_channels = True

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = 1.0  # the per-head temperature multiplies the normalised scores instead
        self.temperature = attn.temperature
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: tokens [B, N, dim] → [B, N, dim]."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)  # each [B, heads, C', N]
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        x = self._attend(q, k, v, lambda scores: scores * self.temperature, self.attn_drop)
        return self.proj_drop(self.proj(x.permute(0, 3, 1, 2).reshape(B, N, C)))
