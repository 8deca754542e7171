"""BEiT attention: a relative position bias per block or shared."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase, merged_qkv
from vitq.nn.modules import QLinear


class QuantRelPosAttention(QuantAttentionBase):
    """Replacement for timm BEiT's ``Attention``: global attention over all tokens with an optional learned
    relative position bias (own table, and/or one shared by all blocks passed to ``forward``).

    The q/v biases are merged into ``qkv.bias`` (:func:`merged_qkv`); the table and its index keep timm's names.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.window_size = attn.window_size
        self.relative_position_bias_table = attn.relative_position_bias_table
        index = attn.relative_position_index
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = QLinear(merged_qkv(attn.qkv, attn.q_bias, attn.k_bias, attn.v_bias), "post_ln")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """[1, heads, N, N] bias gathered from the table (N = window area + the class token), as timm's."""
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

        def add_bias(attn: torch.Tensor) -> torch.Tensor:
            if self.relative_position_bias_table is not None:
                attn = attn + self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                attn = attn + shared_rel_pos_bias
            return attn

        x = self._attend(q, k, v, add_bias, self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))
