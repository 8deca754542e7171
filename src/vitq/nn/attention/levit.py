"""LeViT attention and its downsampling variant."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase


class _QuantLevitAttentionBase(QuantAttentionBase):
    """What LeViT's two attentions share: the scale multiplies the score product (timm's order, so the ``q`` point
    sees the unscaled queries; ``scale`` is 1) and the learned bias ``attention_biases[:, attention_bias_idxs]``
    ([heads, N_q, N_k], a table over the ``(|Δrow|, |Δcol|)`` offsets of a query and a key position gathered by a
    fixed index) is added to the scaled scores in float before the softmax point. timm caches the gathered bias in
    eval mode; it is gathered on every call here, the same values. The BatchNorms of timm's ``LinearNorm`` layers
    are expected folded (:func:`vitq.models.base.fold_batchnorm`), their Linears wrapped by the adapter."""

    def _init_levit(self, attn: nn.Module) -> None:
        if attn.use_conv:
            raise NotImplementedError("LeViT's conv mode (use_conv=True) is not supported")
        self.num_heads, self.key_dim, self.val_dim = attn.num_heads, attn.key_dim, attn.val_dim
        self.val_attn_dim = attn.val_attn_dim
        self.resolution = tuple(attn.resolution)
        self.scale = 1.0  # timm scales q·kᵀ, not q: score_scale is applied to the product
        self.score_scale = attn.scale
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)
        self.attn_drop = nn.Identity()  # timm's LeViT attention has no attention dropout

    def _scale_and_bias(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.score_scale + self.attention_biases[:, self.attention_bias_idxs]


class QuantLevitAttention(_QuantLevitAttentionBase):
    """Replacement for timm LeViT's ``Attention`` (linear mode), following timm's path step by step:
    ``qkv`` → per head split into q, k (``key_dim``) and v (``val_dim``) →
    ``softmax(Q(q) Q(k)ᵀ · scale + bias) → Q → @ Q(v)`` → ``proj`` (Hardswish, then a Linear).

    Keeps timm's attribute names and modules: ``qkv`` (a ``LinearNorm``), ``proj`` (``act``, ``ln``),
    ``attention_biases`` (``attention_bias_idxs`` is a non-persistent buffer, as in timm). The ``qkv`` rows keep
    timm's per-head ``[q | k | v]`` layout. ``proj``'s input is the attention output with the heads merged (its
    Hardswish comes first, inside ``proj``), as the softmax point's consumers assume.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self._init_levit(attn)
        self.qkv = attn.qkv
        self._init_points()  # registered before proj so module order = forward order
        self.proj = attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, N, dim] tokens of the stage's grid."""
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, self.num_heads, -1)
        q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3))
        x = self._attend(q, k, v, self._scale_and_bias, self.attn_drop)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.val_attn_dim))


class QuantLevitAttentionDownsample(_QuantLevitAttentionBase):
    """Replacement for timm LeViT's ``AttentionDownsample`` (linear mode): attention with subsampling, whose
    queries come from every ``stride``-th token of the grid and whose keys and values come from all tokens, so the
    output has the subsampled grid's tokens:
    ``kv`` → per head k, v; ``q_proj`` (subsample, then a Linear) → per head q;
    ``softmax(Q(q) Q(k)ᵀ · scale + bias) → Q → @ Q(v)`` → ``proj`` (Hardswish, then a Linear to the next width).

    timm's query module ``q`` (``down`` + ``ln``) would take the name of the ``q`` quantization point; it is kept
    as is under the name ``q_proj``, so a quantized model's tensor names differ from timm's there
    (``attn_downsample.q.ln.linear.weight`` → ``attn_downsample.q_proj.ln.linear.weight``). Everything else keeps
    timm's names (``kv``, ``proj``, ``attention_biases``).
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self._init_levit(attn)
        self.stride = attn.stride
        self.kv = attn.kv
        self.q_proj = attn.q
        self._init_points()  # registered before proj so module order = forward order
        self.proj = attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, N, in_dim] tokens of the grid → [B, N_sub, out_dim] tokens of the subsampled grid."""
        B, N, _ = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        q = self.q_proj(x).view(B, -1, self.num_heads, self.key_dim)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        x = self._attend(q, k, v, self._scale_and_bias, self.attn_drop)
        return self.proj(x.transpose(1, 2).reshape(B, -1, self.val_attn_dim))
