"""ConViT gated positional self-attention."""

from __future__ import annotations

import torch
from torch import nn

from vitq.nn.attention.base import QuantAttentionBase, stacked_linear
from vitq.nn.modules import QLinear


class QuantGatedPositionalAttention(QuantAttentionBase):
    """Replacement for timm ConViT's ``GPSA`` (gated positional self-attention), following timm's forward step by
    step: per head, the content probabilities ``softmax(Q(q·scale) Q(k)ᵀ)`` and the positional probabilities
    ``softmax(pos_proj(rel))`` are mixed by the learned gate ``σ = sigmoid(gating_param)``,
    ``(1 − σ)·content + σ·positional``, renormalised over the keys, then ``→ Q → @ Q(v)`` → ``proj``.

    The ``softmax`` point quantizes that final mixed map, the probabilities that multiply v. The content softmax, the
    positional scores and their softmax, the gate and the renormalisation stay float: the positional scores come from
    the small Linear ``pos_proj`` (3 → heads) over the fixed table ``rel`` of patch offsets ``(Δx, Δy, Δx² + Δy²)``,
    so they depend on no input, like a relative position bias; the gate is one number per head. ``score_probs`` (an
    identity) marks the content probabilities, so a search that needs the gradient of the scores (``ptq4vit``'s
    Hessian) takes it through the content softmax rather than through the mix.

    timm's separate ``qk`` (q and k) and ``v`` Linears are stacked into one ``qkv`` Linear
    (:func:`stacked_linear`; timm's ``v`` would also take the name of the ``v`` quantization point), so the points are
    named as ViT's: a quantized model's ``attn.qk.*`` / ``attn.v.*`` tensors become ``attn.qkv.*``. ``pos_proj``,
    ``gating_param`` and ``proj`` keep their names; ``rel_indices`` is a non-persistent buffer, recomputed for the token
    count of the input (a square grid), as in timm.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale, self.dim = attn.num_heads, attn.scale, attn.dim
        self.qkv = QLinear(stacked_linear((attn.qk, attn.v)), "post_ln")
        self.pos_proj = attn.pos_proj
        self.gating_param = attn.gating_param
        self.register_buffer("rel_indices", attn.rel_indices, persistent=False)
        self.attn_drop = attn.attn_drop
        self.score_probs = nn.Identity()
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def relative_indices(self, num_patches: int) -> torch.Tensor:
        """[1, N, N, 3] offsets ``(Δx, Δy, Δx² + Δy²)`` from patch i to patch j of a square ``√N × √N`` grid in
        row-major order (the table timm's GPSA computes)."""
        side = int(num_patches ** 0.5)
        coords = torch.arange(side, dtype=torch.float32)
        rows, cols = coords.repeat_interleave(side), coords.repeat(side)
        dx, dy = cols.view(1, -1) - cols.view(-1, 1), rows.view(1, -1) - rows.view(-1, 1)
        table = torch.stack((dx, dy, dx ** 2 + dy ** 2), dim=-1).unsqueeze(0)
        return table.to(device=self.qkv.weight.device, dtype=self.qkv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the patch tokens [B, N, dim] of a square grid → [B, N, dim]."""
        B, N, C = x.shape
        if self.rel_indices.shape[1] != N:
            self.rel_indices = self.relative_indices(N)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        positional = self.pos_proj(self.rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2).softmax(dim=-1)
        content = self.score_probs((self.q(q * self.scale) @ self.k(k).transpose(-2, -1)).softmax(dim=-1))
        v = self.v(v)  # quantized before the attention map, as in _attend
        gate = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
        mixed = (1.0 - gate) * content + gate * positional
        probs = self.softmax(mixed / mixed.sum(dim=-1, keepdim=True))
        x = self.attn_drop(self.value_weights(probs)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
