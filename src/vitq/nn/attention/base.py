"""The base of every explicit attention and the plain ViT attention; helpers that merge timm's separate
q/k/v projections into one ``qkv`` Linear."""

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
        # softmax quantizer can be chosen by the error of its real consumer value_weights(Q(A))·Q(v)
        v = self.v(v)
        attn = self.softmax(attn.softmax(dim=-1))
        return attn_drop(self.value_weights(attn)) @ v

    def value_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """The weights of the values ``v`` from the softmax point's output ``probs`` [B, heads, N, N']: ``probs``
        itself. The softmax point's consumer is ``value_weights(probs) @ v``; output-error searches of the softmax
        quantizer use it, and attention that transforms the probabilities first (talking heads) overrides it."""
        return probs

    def norm_before_proj(self) -> bool:
        """Whether a norm sits between the attention output and ``proj`` (EVA's ``scale_attn_inner``), so that
        ``proj`` does not read ``value_weights(probs) @ v`` with the heads merged. Attention whose ``norm`` is
        elsewhere (before ``qkv``) overrides it."""
        return not isinstance(getattr(self, "norm", nn.Identity()), nn.Identity)


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


def merged_qkv(qkv: nn.Linear, q_bias: torch.Tensor | None, k_bias: torch.Tensor | None,
               v_bias: torch.Tensor | None) -> nn.Linear:
    """``qkv`` with the separate q/k/v biases of BEiT/EVA-style attention merged into its own bias.

    Those models keep the qkv Linear bias-free and add ``cat(q_bias, 0, v_bias)`` in their forward; a plain
    biased Linear computes the same, and every method, fold and export then handles it like ViT's ``qkv``.
    A missing part of the bias is zero (BEiT's ``k_bias`` is a zero buffer)."""
    if q_bias is None and k_bias is None and v_bias is None:
        return qkv
    parts = [b if b is not None else torch.zeros(qkv.out_features // 3, dtype=qkv.weight.dtype,
                                                  device=qkv.weight.device) for b in (q_bias, k_bias, v_bias)]
    bias = torch.cat([b.detach() for b in parts])
    if qkv.bias is not None:
        bias = bias + qkv.bias.detach()
    merged = nn.Linear(qkv.in_features, qkv.out_features, bias=True, device="meta")
    merged.weight = qkv.weight
    merged.bias = nn.Parameter(bias.clone())
    return merged


def stacked_linear(linears: tuple[nn.Linear, ...]) -> nn.Linear:
    """One Linear computing ``cat([linear(x) for linear in linears], -1)``: the weights stacked along the output
    axis, the biases concatenated (a missing bias is zero; none at all gives a bias-free Linear)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    stacked.weight = nn.Parameter(weight)
    if any(linear.bias is not None for linear in linears):
        stacked.bias = nn.Parameter(torch.cat([
            linear.bias.detach() if linear.bias is not None else weight.new_zeros(linear.out_features)
            for linear in linears]))
    return stacked
