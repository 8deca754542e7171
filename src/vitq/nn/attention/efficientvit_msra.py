"""EfficientViT (MSRA) cascaded group attention."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase
from vitq.nn.modules import QConv2d


class QuantCascadedHead(QuantAttentionBase):
    """One head of EfficientViT (MSRA)'s cascaded group attention: ``softmax(Q(q·scale) Q(k)ᵀ + bias) → Q → @ Q(v)``
    over the N pixels of a window, for q, k ([B, key_dim, N]) and v ([B, val_dim, N]) as timm's convolutions
    make them (channels first). They are laid out as one head, [B, 1, N, dim], so the points and every search see
    the layout of the other attention modules; ``A @ v`` is timm's ``v @ attnᵀ`` transposed, and the output is
    [B, val_dim, N] again. ``A @ v`` passes through the identity ``context``: no ``proj`` reads one head's output
    (the heads are concatenated and the next head's input depends on it), so searches by the attention output's
    error (ptq4vit) take its gradient there."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.num_heads, self.scale = 1, scale
        self.attn_drop = nn.Identity()  # timm's cascaded group attention has no attention dropout
        self._init_points()
        self.context = nn.Identity()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``q``, ``k``: [B, key_dim, N]; ``v``: [B, val_dim, N]; ``bias``: [N, N] → [B, val_dim, N]."""
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        return self.context(self._attend(q, k, v, bias, self.attn_drop)).squeeze(1).transpose(1, 2)


class QuantCascadedGroupAttention(nn.Module):
    """Replacement for timm EfficientViT (MSRA)'s ``CascadedGroupAttention``, following timm's forward step by step.

    The input [B, C, H, W] (one window) is split into ``num_heads`` channel groups. Head ``i`` reads its group plus
    the previous head's output (the cascade), makes q, k and v with the 1×1 ``qkvs.{i}`` convolution, refines q
    with the depthwise ``dws.{i}`` convolution, and attends over the H·W pixels with a learned bias per pixel
    offset (:class:`QuantCascadedHead`, its points ``heads.{i}.q`` / ``.k`` / ``.v`` / ``.softmax``). ``proj``
    (ReLU, then a 1×1 convolution) mixes the concatenated head outputs.

    The bias ``attention_biases[:, attention_bias_idxs]`` ([heads, N, N], a table over the distinct
    ``(|Δrow|, |Δcol|)`` offsets) depends on no input: it is added to the scores in float before the softmax point
    (timm caches the gathered tensor in eval mode; it is gathered on every call here, the same values). The
    convolutions are timm's ``ConvNorm`` modules with their BatchNorm already folded (the adapter folds before
    wrapping); their ``conv`` becomes a :class:`~vitq.nn.QConv2d` (role ``act``: a channel group of the block's
    stream plus the previous head's output, a convolution output (q), a ReLU output). Keeps timm's names
    (``qkvs``, ``dws``, ``proj``, ``attention_biases``; ``attention_bias_idxs`` is a non-persistent buffer, as in
    timm); ``heads`` is new and holds no tensor.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.key_dim, self.val_dim, self.attn_ratio = attn.key_dim, attn.val_dim, attn.attn_ratio
        self.resolution = attn.resolution
        self.qkvs, self.dws = attn.qkvs, attn.dws
        for convs in (self.qkvs, self.dws):
            for conv_norm in convs:
                conv_norm.conv = QConv2d(conv_norm.conv, "act")
        self.heads = nn.ModuleList(QuantCascadedHead(attn.scale) for _ in range(attn.num_heads))
        self.proj = attn.proj
        self.proj[1].conv = QConv2d(self.proj[1].conv, "act")  # after proj's ReLU
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)

    def set_resolution(self, resolution: int) -> None:
        raise NotImplementedError("resize the timm model before wrapping it for quantization")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: one window [B, C, H, W] with ``H·W`` the bias table's N → [B, C, H, W]."""
        B, _, H, W = x.shape
        groups = x.chunk(self.num_heads, dim=1)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        outputs = []
        feat = groups[0]
        for i, (qkv, dw, head) in enumerate(zip(self.qkvs, self.dws, self.heads, strict=True)):
            if i > 0:
                feat = feat + groups[i]
            q, k, v = qkv(feat).view(B, -1, H, W).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            feat = head(q.flatten(2), k.flatten(2), v.flatten(2), bias[i]).view(B, self.val_dim, H, W)
            outputs.append(feat)
        return self.proj(torch.cat(outputs, 1))
