"""Explicit multi-head attention with quantization points on q, k, v and the softmax output.

timm's ``Attention`` uses ``F.scaled_dot_product_attention`` when fused attention is enabled,
which silently bypasses any quantizer placed on the attention map. These modules always compute
``softmax(q kᵀ · scale + bias) v`` step by step, with the same attribute names as timm so the
checkpoint keys do not change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitq.nn.modules import QAct, QLinear


class QuantAttentionBase(nn.Module):
    """Shared q/k/v/softmax quantization points and the explicit attention product."""

    def _init_points(self) -> None:
        self.q = QAct("attn_q")
        self.k = QAct("attn_k")
        self.v = QAct("attn_v")
        self.softmax = QAct("softmax")

    def _attend(self, q, k, v, bias: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None,
                attn_drop: nn.Module) -> torch.Tensor:
        """``softmax(Q(q·scale) Q(k)ᵀ + bias) → Q → @ Q(v)`` for [B, heads, N, head_dim] inputs.

        ``bias`` is a tensor added to the scores, or a function of the scores (to reproduce a
        reference implementation's exact order of additions).
        """
        attn = self.q(q * self.scale) @ self.k(k).transpose(-2, -1)
        if callable(bias):
            attn = bias(attn)
        elif bias is not None:
            attn = attn + bias
        # v is quantized before the attention map so that, during forward-order calibration, the
        # softmax quantizer can be chosen by the error of its real consumer Q(A)·Q(v)
        v = self.v(v)
        attn = self.softmax(attn.softmax(dim=-1))
        return attn_drop(attn) @ v


class QuantAttention(QuantAttentionBase):
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
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention masks are not supported by quantized attention")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self._attend(self.q_norm(q), self.k_norm(k), v, None, self.attn_drop)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(QuantAttentionBase):
    """Replacement for timm Swin's ``WindowAttention`` (relative position bias, shifted-window mask).

    Keeps timm's attribute names, so the ``state_dict`` keys are unchanged:
    ``qkv``, ``relative_position_bias_table``, ``proj`` (``relative_position_index`` is a
    non-persistent buffer, as in timm). Follows timm's non-fused path step by step.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.dim = attn.dim
        self.window_size, self.window_area = tuple(attn.window_size), attn.window_area
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """[1, heads, N, N] bias gathered from the table (as timm's ``WindowAttention``)."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous()
        return bias.unsqueeze(0)

    def set_window_size(self, window_size) -> None:
        raise NotImplementedError("resize the timm model before wrapping it for quantization")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: [num_windows*B, N, C]; ``mask``: (0/-inf) [num_windows, N, N] or ``None``."""
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        def add_bias(attn: torch.Tensor) -> torch.Tensor:
            attn = attn + self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            return attn

        x = self._attend(q, k, v, add_bias, self.attn_drop)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))
