"""CaiT: talking-heads attention and class attention."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase, stacked_linear
from vitq.nn.modules import QLinear


def _mix_heads(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear`` (a [heads, heads] Linear) applied over the head axis of ``x`` [B, heads, N, N']."""
    return linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class QuantTalkingHeadAttention(QuantAttentionBase):
    """Replacement for timm CaiT's ``TalkingHeadAttn``: global attention whose heads are mixed twice, by ``proj_l``
    on the scores before the softmax and by ``proj_w`` on the probabilities after it (talking-heads attention,
    Shazeer et al. 2020), following timm's non-fused path step by step:
    ``softmax(proj_l(Q(q·scale) Q(k)ᵀ)) → Q → proj_w → @ Q(v)``, each mix over the head axis.

    The ``softmax`` point quantizes the probabilities (they sum to 1 over the keys), the tensor the post-softmax
    quantizers are made for; ``proj_w``'s output is a signed mix of them that no longer is a distribution.
    ``proj_w`` is the softmax point's consumer (:meth:`value_weights`), so output-error searches of the softmax
    quantizer measure the error after the mix.

    ``proj_l`` and ``proj_w`` stay float modules, not quantization points: each is heads x heads weights (nothing to
    save by quantizing them), and both act on products of quantized operands rather than on operands: the scores
    ``Q(q)·Q(k)ᵀ`` are mixed before the softmax as a relative position bias is added, and
    ``proj_w(Q(A))·Q(v) = Σ_h' W[h, h'] Q(A_h')·Q(v_h) + b_h Σ Q(v_h)`` is a mix of the products
    ``Q(A_h')·Q(v_h)`` of quantized operands. Keeps timm's attribute names (``qkv``, ``proj_l``, ``proj_w``,
    ``proj``), so the ``state_dict`` keys are unchanged.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.attn_drop = attn.attn_drop
        self.proj_l = attn.proj_l
        self._init_points()  # registered between the two head mixes and before proj: module order = forward order
        self.proj_w = attn.proj_w
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def value_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """``proj_w`` over the heads of the (quantized) probabilities ``probs`` [B, heads, N, N]."""
        return _mix_heads(self.proj_w, probs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self._attend(q, k, v, lambda scores: _mix_heads(self.proj_l, scores), self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class QuantClassAttention(QuantAttentionBase):
    """Replacement for timm CaiT's ``ClassAttn``: the class token (token 0) attends to every token,
    ``softmax(Q(q_cls·scale) Q(k)ᵀ) → Q → @ Q(v)``, and only its output is returned ([B, 1, dim]).

    timm's separate ``q``, ``k`` and ``v`` Linears would take the names of the ``q``/``k``/``v`` quantization points;
    they are stacked into one ``qkv`` Linear (:func:`stacked_linear`), so the points are named as ViT's and every
    method handles this ``qkv`` as ViT's. A quantized model's ``state_dict`` therefore differs from timm's here:
    ``attn.q.*``, ``attn.k.*``, ``attn.v.*`` become ``attn.qkv.weight`` / ``attn.qkv.bias``. ``qkv`` computes a query
    for every token; only the class token's is used, the same function as timm's ``q(x[:, 0])``, and the ``q`` point
    sees only that one ([B, heads, 1, head_dim]).
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.qkv = QLinear(stacked_linear((attn.q, attn.k, attn.v)), "post_ln")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``cat(class token, patch tokens)`` [B, N, dim] → the class token's attention output [B, 1, dim]."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x_cls = self._attend(q[:, :, :1], k, v, None, self.attn_drop)
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, C)))
