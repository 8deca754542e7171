"""Quantization points: drop-in replacements for the layers of a timm model.

Each point owns one or two quantizer *slots* (attributes that hold a
:class:`~vitq.quantizers.Quantizer` or ``None`` for float):

- :class:`QLinear` / :class:`QConv2d`: ``weight_quantizer`` and ``input_quantizer``;
- :class:`QAct`: ``quantizer``, an activation-only point (q, k, v, softmax output);
- :class:`QLayerNorm`: ``input_quantizer`` on a LayerNorm's input (the residual stream), float unless a
  method asks for it (FQ-ViT quantizes it, to run LayerNorm in integers).

The wrapped layers keep their parameter names (``weight``, ``bias``), so a timm ``state_dict``
loads into a wrapped model unchanged. Each slot carries a *role* (what kind of tensor it sees,
e.g. ``post_ln`` for a post-LayerNorm activation) that methods use to pick a quantizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitq.nn.outliers import ChannelSplit
from vitq.quantizers import Quantizer

#: slot roles, the vocabulary shared by model adapters (who label) and methods (who choose)
ROLES = (
    "weight",  # a Linear/Conv weight
    "image",  # the normalised image entering the patch embedding
    "post_ln",  # a post-LayerNorm activation (input of qkv, fc1, Swin reduction)
    "post_gelu",  # the input of fc2
    "act",  # any other Linear input (attention proj, head)
    "attn_q",
    "attn_k",
    "attn_v",
    "softmax",  # post-Softmax attention probabilities
    "pre_ln",  # a LayerNorm input (the residual stream); float by default
)


def _apply(quantizer: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


class QuantPoint(nn.Module):
    """Base class of quantization points: maps slot attribute names to roles."""

    slot_roles: dict[str, str]

    def slots(self) -> dict[str, str]:
        return dict(self.slot_roles)


class QLinear(QuantPoint):
    """``nn.Linear`` with fake-quantized weight and input."""

    def __init__(self, linear: nn.Linear, input_role: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer: Quantizer | None = None
        self.input_quantizer: Quantizer | None = None
        self.outlier_split: ChannelSplit | None = None  # outlier input channels kept float (vitq.nn.outliers)
        self.slot_roles = {"weight_quantizer": "weight", "input_quantizer": input_role}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.outlier_split
        if split is None:
            return F.linear(_apply(self.input_quantizer, x), _apply(self.weight_quantizer, self.weight), self.bias)
        if not split.selected:
            split.select(x)
        keep = 1.0 - split.mask  # the two-part product of vitq.nn.outliers
        quantized = F.linear(_apply(self.input_quantizer, x * keep), _apply(self.weight_quantizer, self.weight * keep),
                             self.bias)
        return quantized + F.linear(x * split.mask, self.weight * split.mask)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QConv2d(QuantPoint):
    """``nn.Conv2d`` with fake-quantized weight (per output channel) and input."""

    def __init__(self, conv: nn.Conv2d, input_role: str) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={conv.padding_mode!r} is not supported")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight_quantizer: Quantizer | None = None
        self.input_quantizer: Quantizer | None = None
        self.slot_roles = {"weight_quantizer": "weight", "input_quantizer": input_role}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _apply(self.weight_quantizer, self.weight)
        return F.conv2d(_apply(self.input_quantizer, x), weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class QAct(QuantPoint):
    """An activation-only quantization point (identity in float)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.quantizer: Quantizer | None = None
        self.slot_roles = {"quantizer": role}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(self.quantizer, x)


class QLayerNorm(nn.LayerNorm, QuantPoint):
    """``nn.LayerNorm`` with a fake-quantized input. Still an ``nn.LayerNorm`` (same ``weight``/``bias``
    parameters, so RepQ-ViT's fold into its affine and timm's state_dict keys are unchanged)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        nn.Module.__init__(self)
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.elementwise_affine = norm.elementwise_affine
        self.weight, self.bias = norm.weight, norm.bias
        self.input_quantizer: Quantizer | None = None
        self.slot_roles = {"input_quantizer": "pre_ln"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(_apply(self.input_quantizer, x), self.normalized_shape, self.weight, self.bias, self.eps)
