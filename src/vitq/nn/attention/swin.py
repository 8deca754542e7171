"""Swin window attention (v1: relative position bias; v2: scaled cosine attention with a continuous position
bias)."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase, merged_qkv
from vitq.nn.modules import QLinear


class _QuantWindowAttentionBase(QuantAttentionBase):
    """What Swin v1's and v2's window attentions share: the forward over windows with the relative position bias and
    the shifted-window mask (0 / a large negative value) added to the scores, timm's non-fused path step by step.
    A subclass gives the bias (``_get_rel_pos_bias``) and may transform the product's operands and its scores."""

    def _get_rel_pos_bias(self) -> torch.Tensor:
        raise NotImplementedError

    def _operands(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The q and k the score product (and its quantization points) sees."""
        return q, k

    def _scores(self, attn: torch.Tensor) -> torch.Tensor:
        """The product's scores before the bias is added."""
        return attn

    def set_window_size(self, window_size) -> None:
        raise NotImplementedError("resize the timm model before wrapping it for quantization")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: [num_windows*B, N, C]; ``mask``: [num_windows, N, N] or ``None``."""
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        def bias_and_mask(attn: torch.Tensor) -> torch.Tensor:
            attn = self._scores(attn) + self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            return attn

        x = self._attend(*self._operands(q, k), v, bias_and_mask, self.attn_drop)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(_QuantWindowAttentionBase):
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



class QuantCosineWindowAttention(_QuantWindowAttentionBase):
    """Replacement for timm Swin V2's ``WindowAttention``: scaled cosine attention with a continuous relative
    position bias and the shifted-window mask, following timm's non-fused path step by step.

    Scores: ``(normalize(q) · normalize(k)ᵀ) · exp(min(logit_scale, log 100)) + 16·sigmoid(cpb) (+ mask)``. The
    ``q`` and ``k`` points see the L2-normalised queries and keys, the operands of the product (``scale`` is 1);
    the learned per-head logit scale multiplies the product after it, as in timm, so the float output is timm's
    exactly. The position bias comes from the small MLP ``cpb_mlp`` over the fixed log-spaced coordinate table; it
    depends on no input, so it stays float, like the relative position tables of Swin v1 and BEiT.

    Keeps timm's attribute names: ``logit_scale``, ``cpb_mlp``, ``qkv``, ``proj`` (``relative_coords_table`` and
    ``relative_position_index`` are non-persistent buffers, as in timm). The separate q/v biases are merged into
    ``qkv.bias`` (:func:`merged_qkv`). ``qkv`` reads the residual stream of a post-norm block: role ``act``.
    """

    def __init__(self, attn: nn.Module) -> None:
        import math

        super().__init__()
        self.dim = attn.dim
        self.window_size = tuple(attn.window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.pretrained_window_size = tuple(attn.pretrained_window_size)
        self.num_heads = attn.num_heads
        self.scale = 1.0  # no head_dim^-1/2: the per-head logit scale multiplies the cosine scores instead
        self.max_logit_scale = math.log(1.0 / 0.01)
        self.logit_scale = attn.logit_scale
        self.cpb_mlp = attn.cpb_mlp
        self.register_buffer("relative_coords_table", attn.relative_coords_table, persistent=False)
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = QLinear(merged_qkv(attn.qkv, attn.q_bias, attn.k_bias, attn.v_bias), "act")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """[1, heads, N, N] bias ``16·sigmoid(cpb_mlp(table))`` gathered by the relative position index."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(self.window_area, self.window_area, -1)
        bias = bias.permute(2, 0, 1).contiguous()
        return (16 * torch.sigmoid(bias)).unsqueeze(0)

    def _get_logit_scale(self) -> torch.Tensor:
        """[heads, 1, 1] multiplier of the cosine scores, ``exp(logit_scale)`` clamped at 100."""
        return torch.clamp(self.logit_scale, max=self.max_logit_scale).exp()

    def _operands(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The L2-normalised queries and keys (cosine attention)."""
        return nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)

    def _scores(self, attn: torch.Tensor) -> torch.Tensor:
        return attn * self._get_logit_scale()
