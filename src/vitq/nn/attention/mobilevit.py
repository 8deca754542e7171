"""MobileViT v2 separable (linear) self-attention."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase
from vitq.nn.modules import QAct, QConv2d


class QuantLinearSelfAttention(QuantAttentionBase):
    """Replacement for timm MobileViT v2's ``LinearSelfAttention`` (separable self-attention, Mehta & Rastegari
    2022), following timm's self-attention path step by step. Input and output are ``[B, dim, P, N]`` (P pixels per
    patch, N patches); the attention runs over the N patches separately for each of the P pixel positions.

    ``qkv_proj`` (a 1×1 convolution) gives one context score per token (``query``), a key and a value. The scores
    are normalised over the patches, ``A = softmax(query)``, the context vector is the A-weighted sum of the keys,
    ``c = Σ_n A_n · key_n``, and the output is ``out_proj(relu(value) ⊙ c)``. There is no N×N map and no q·kᵀ
    product, so there are no ``q`` / ``k`` points. In the ``[batch, heads, queries, keys]`` layout of the other
    attention modules, the P pixel positions are the heads and each has one query: the ``softmax`` point sees
    ``A`` as ``[B, P, 1, N]`` (its last axis sums to 1) and the ``v`` point sees timm's ``key`` as ``[B, P, N, dim]``,
    the operand ``A`` weights, so ``c = value_weights(Q(A)) @ Q(key)`` is the softmax point's consumer as in softmax
    attention (the role ``v`` has there). ``relu(value) ⊙ c`` is an elementwise product; ``out_proj``'s input point
    quantizes its result. ``c`` passes through the identity ``context``, so a search by the context's error can take
    its gradient there (no ``proj`` reads it). Both convolutions keep timm's names and read an activation (role
    ``act``): ``qkv_proj`` a ``GroupNorm1`` output, ``out_proj`` the gated context.

    Cross-attention (timm's ``x_prev``) is not supported.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.embed_dim = attn.embed_dim
        self.qkv_proj = QConv2d(attn.qkv_proj, "act")
        self.attn_drop = attn.attn_drop
        self.v = QAct("attn_v")  # registered before out_proj, v before softmax: module order = forward order
        self.softmax = QAct("softmax")
        self.context = nn.Identity()  # where searches by the context's error (ptq4vit) find its gradient
        self.out_proj = QConv2d(attn.out_proj, "act")
        self.out_drop = attn.out_drop

    def norm_before_proj(self) -> bool:
        """``True``: no ``proj`` reads ``value_weights(probs) @ v`` (``out_proj`` reads it gated by the values)."""
        return True

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: [B, dim, P, N] → [B, dim, P, N]."""
        if x_prev is not None:
            raise NotImplementedError("cross-attention is not supported by quantized linear self-attention")
        query, key, value = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        key = self.v(key.permute(0, 2, 3, 1))  # [B, P, N, dim], quantized before the scores as in _attend
        probs = self.softmax(query.permute(0, 2, 1, 3).softmax(dim=-1))  # [B, P, 1, N]
        context = self.context(self.attn_drop(self.value_weights(probs)) @ key)  # [B, P, 1, dim]
        out = nn.functional.relu(value) * context.permute(0, 3, 1, 2)  # [B, dim, P, N] ⊙ [B, dim, P, 1]
        return self.out_drop(self.out_proj(out))
