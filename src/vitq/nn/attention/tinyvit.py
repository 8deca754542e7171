"""TinyViT attention: attention biases per head, LayerNorm inside the module."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase
from vitq.nn.modules import QLinear


class QuantTinyVitAttention(QuantAttentionBase):
    """Replacement for timm TinyViT's ``Attention``: attention over the tokens of one window that normalises its own
    input, with a learned bias per head and window offset, following timm's non-fused path step by step:
    ``norm`` → ``qkv`` → per head split into q, k (``key_dim``) and v (``val_dim``) →
    ``softmax(Q(q·scale) Q(k)ᵀ + bias) → Q → @ Q(v)`` → ``proj``.

    The bias is ``attention_biases[:, attention_bias_idxs]`` ([heads, N, N]): a table over the distinct
    ``(|Δrow|, |Δcol|)`` offsets of two window positions, gathered by a fixed index. It depends on no input and is
    added to the scores in float before the softmax point (timm caches the gathered tensor in eval mode; it is
    gathered on every call here, the same values).

    ``norm`` (the LayerNorm before ``qkv``) is ``qkv``'s whole input: ``qkv`` has role ``post_ln`` and
    ``norm`` → ``qkv`` is a fold pair. Keeps timm's attribute names (``norm``, ``qkv``, ``proj``,
    ``attention_biases``; ``attention_bias_idxs`` is a non-persistent buffer, as in timm), and the ``qkv`` rows keep
    timm's per-head ``[q | k | v]`` layout.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.key_dim, self.val_dim, self.out_dim = attn.key_dim, attn.val_dim, attn.out_dim
        self.resolution = tuple(attn.resolution)
        self.norm = attn.norm
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)
        self.attn_drop = nn.Identity()  # timm's TinyViT attention has no attention dropout
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")

    def norm_before_proj(self) -> bool:
        """``False``: ``norm`` normalises the input of ``qkv``; ``proj`` reads the attention output itself."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the tokens of each window [B·windows, N, dim] (timm's block partitions and pads)."""
        B, N, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(B, N, self.num_heads, -1)
        q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3))
        x = self._attend(q, k, v, self.attention_biases[:, self.attention_bias_idxs], self.attn_drop)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.out_dim))
