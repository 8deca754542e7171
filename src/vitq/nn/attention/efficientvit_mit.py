"""EfficientViT (MIT) lightweight multi-scale ReLU linear attention."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from vitq.nn.modules import QAct, QConv2d


class QuantLiteMLA(nn.Module):
    """Replacement for timm EfficientViT (MIT)'s ``LiteMLA`` (Cai et al.), following timm's forward step by step.

    The 1×1 ``qkv`` convolution makes q, k and v; each ``aggreg.{s}`` branch (a depthwise ``s``×``s`` convolution,
    then a 1×1 convolution grouped per head) aggregates them over a neighbourhood, and the heads of every branch
    attend side by side: for q, k, v of one head ([N, dim] over the H·W pixels),

        out = relu(q) · (relu(k)ᵀ · v) / (relu(q) · Σₙ relu(k)ₙ + eps),

    linear attention with the ReLU kernel: ``relu(k)ᵀ·[v, 1]`` gives the product and the normaliser in one
    product (timm pads v with a column of ones), computed in float32 with autocast off as timm does, then cast back
    to the input's dtype. ``proj`` (a 1×1 convolution) mixes the heads' outputs.

    There is no softmax and no N×N attention map, hence no ``softmax`` point. The points, laid out
    [B, heads, ·, ·] like the q/k/v points of softmax attention (axis 1 = the heads of every branch), are the
    operands of the two products:

    - ``q`` and ``k`` (``attn_q``, ``attn_k``): relu(q) and relu(k), [B, heads, N, dim], non-negative;
    - ``v`` (``attn_v``): v, [B, heads, N, dim], before the column of ones is appended, which stays exact;
    - ``kv`` (``attn_v``): relu(k)ᵀ·v, [B, heads, dim, dim], the operand relu(q) multiplies in the output product:
      it plays the role v has in ``A·v``. The normaliser column Σₙ relu(k)ₙ is left out of it: it is a sum of the
      quantized k (exact in integer arithmetic), and its scale, which grows with N, would swamp the product's.

    The normalised output is not a point of its own: it is exactly ``proj``'s input, whose input point quantizes it.
    The convolutions keep timm's names (``qkv``, ``aggreg``, ``proj``); ``qkv.conv``, ``aggreg.{s}.0`` and
    ``aggreg.{s}.1`` (depthwise and grouped) and ``proj.conv`` become :class:`~vitq.nn.QConv2d` points (role
    ``act``: the block input, the qkv maps, the attention output). Their BatchNorms (``proj.norm``) are expected
    folded before wrapping, as the adapter does; an unfolded one still runs, in float.

    Not a :class:`~vitq.nn.attention.QuantAttentionBase`: the searches that work on a softmax map (its quantizer's
    search by the attention output, FPCS's q·kᵀ and A·v searches, PTQ4ViT's score and context products) have none
    to work on here, and leave these points to each method's activation calibration.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.dim, self.eps = attn.dim, attn.eps
        self.qkv = attn.qkv
        self.qkv.conv = QConv2d(self.qkv.conv, "act")
        self.aggreg = attn.aggreg
        for branch in self.aggreg:
            for i, conv in enumerate(branch):
                branch[i] = QConv2d(conv, "act")
        self.kernel_func = attn.kernel_func
        self.q = QAct("attn_q")  # registered before proj: module order = forward order
        self.k = QAct("attn_k")
        self.v = QAct("attn_v")
        self.kv = QAct("attn_v")
        self.proj = attn.proj
        self.proj.conv = QConv2d(self.proj.conv, "act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, C, H, W] → [B, out_channels, H, W]."""
        B, _, H, W = x.shape
        qkv = self.qkv(x)
        multi_scale = torch.cat([qkv, *(branch(qkv) for branch in self.aggreg)], dim=1)
        multi_scale = multi_scale.reshape(B, -1, 3 * self.dim, H * W).transpose(-1, -2)
        q, k, v = multi_scale.chunk(3, dim=-1)
        q = self.q(self.kernel_func(q))
        k = self.k(self.kernel_func(k))
        v = self.v(v)
        with _autocast_off(v):
            out = self._attend(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(B, -1, H, W))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``Q(q) · Q(kᵀv) / (Q(q) · Σ Q(k) + eps)`` in float32, per head, for [B, heads, N, dim] inputs."""
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        kv = k.transpose(-1, -2) @ F.pad(v, (0, 1), mode="constant", value=1.0)  # last column: Σₙ kₙ
        kv = torch.cat([self.kv(kv[..., :-1]), kv[..., -1:]], dim=-1)
        out = q @ kv
        return (out[..., :-1] / (out[..., -1:] + self.eps)).to(dtype)


def _autocast_off(x: torch.Tensor) -> AbstractContextManager:
    """Autocast disabled on ``x``'s device (timm's LiteMLA computes its products in float32); nothing on the meta
    device, where a saved model's shapes are traced and autocast does not exist."""
    return nullcontext() if x.device.type == "meta" else torch.autocast(device_type=x.device.type, enabled=False)
