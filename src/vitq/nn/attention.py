"""Explicit multi-head attention with quantization points on q, k, v and the softmax output.

timm's ``Attention`` uses ``F.scaled_dot_product_attention`` when fused attention is enabled,
which silently bypasses any quantizer placed on the attention map. These modules always compute
``softmax(q kᵀ · scale + bias) v`` step by step, with the same attribute names as timm so the
checkpoint keys do not change.
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.modules import QAct, QLinear


class _QuantAttentionCore(nn.Module):
    """Shared q/k/v/softmax quantization points and the explicit attention product."""

    def _init_points(self) -> None:
        self.q = QAct("attn_q")
        self.k = QAct("attn_k")
        self.v = QAct("attn_v")
        self.softmax = QAct("softmax")

    def _attend(self, q, k, v, bias: torch.Tensor | None, attn_drop: nn.Module) -> torch.Tensor:
        """``softmax(Q(q·scale) Q(k)ᵀ + bias) → Q → @ Q(v)`` for [B, heads, N, head_dim] inputs."""
        attn = self.q(q * self.scale) @ self.k(k).transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        attn = self.softmax(attn.softmax(dim=-1))
        return attn_drop(attn) @ self.v(v)


class QuantAttention(_QuantAttentionCore):
    """Replacement for ``timm.layers.Attention`` (ViT, DeiT, ...)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated attention is not supported")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = attn.num_heads * attn.head_dim
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop
        self._init_points()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention masks are not supported by quantized attention")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self._attend(self.q_norm(q), self.k_norm(k), v, None, self.attn_drop)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))
