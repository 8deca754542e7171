"""EVA/EVA02 attention: rotary position embedding on q and k."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase, merged_qkv, stacked_linear
from vitq.nn.modules import QLinear


class QuantEvaAttention(QuantAttentionBase):
    """Replacement for timm EVA's ``EvaAttention``: global attention with rotary position embedding (RoPE) on the
    patch tokens, following timm's non-fused path step by step.

    Order of operations: ``qkv`` → optional per-head ``q_norm`` / ``k_norm`` → RoPE on the q and k of the non-prefix
    tokens (the class/register tokens are not rotated) → ``softmax(Q(q·scale) Q(k)ᵀ) → Q → @ Q(v)`` → optional
    ``norm`` of the merged heads (``scale_attn_inner``) → ``proj``. The ``q`` and ``k`` points see the rotated queries
    and keys, the operands of the product. The rotation tensor is computed once by the model for its grid and passed
    to every block (``rope``), as in timm.

    ``qkv`` is always one biased Linear: EVA's separate q/v biases (the k bias is a zero buffer) are merged into its
    bias (:func:`merged_qkv`), and the unfused ``q_proj`` / ``k_proj`` / ``v_proj`` of ``qkv_fused=False`` models are
    stacked into it, so the point names and every method's handling are ViT's. ``proj`` reads a LayerNorm output
    when ``norm`` is one (role ``post_ln``), else the attention output (``act``). Gated attention is not supported.
    """

    def __init__(self, attn: nn.Module, qkv_role: str = "post_ln") -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated attention is not supported")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = attn.num_heads * attn.head_dim
        self.num_prefix_tokens = attn.num_prefix_tokens
        self.rotate_half = bool(getattr(attn, "rotate_half", False))
        self.qkv = QLinear(self._fused_qkv(attn), qkv_role)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "post_ln" if isinstance(attn.norm, nn.LayerNorm) else "act")
        self.proj_drop = attn.proj_drop

    @staticmethod
    def _fused_qkv(attn: nn.Module) -> nn.Linear:
        """One ``[3·attn_dim, dim]`` Linear computing ``cat(q, k, v)``, whatever layout ``attn`` stores them in."""
        if attn.qkv is not None:
            return merged_qkv(attn.qkv, attn.q_bias, attn.k_bias, attn.v_bias)
        return stacked_linear((attn.q_proj, attn.k_proj, attn.v_proj))

    def _rotate(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """RoPE on the non-prefix tokens of ``x`` [B, heads, N, head_dim]; ``rope`` is ``cat(sin, cos)`` on its last
        axis, for the patch tokens only. Pairs of channels are rotated: interleaved ``(2i, 2i+1)`` by default, the
        two halves ``(i, i + head_dim/2)`` with ``rotate_half``."""
        prefix, tokens = x[:, :, :self.num_prefix_tokens], x[:, :, self.num_prefix_tokens:]
        sin, cos = rope.chunk(2, -1)
        if self.rotate_half:
            first, second = tokens.chunk(2, -1)
            turned = torch.cat([-second, first], -1)
        else:
            turned = torch.stack([-tokens[..., 1::2], tokens[..., ::2]], -1).reshape(tokens.shape)
        rotated = (tokens * cos + turned * sin).to(tokens.dtype)
        return torch.cat([prefix, rotated], dim=2)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x``: [B, N, dim]; ``rope``: the model's rotary embedding for its patch grid, or ``None``."""
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention masks are not supported by quantized attention")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        x = self._attend(q, k, v, None, self.attn_drop)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))
