"""Adapter for timm ``Levit`` / ``LevitDistilled`` models (LeViT, linear mode): a convolutional stem, then stages of
attention blocks on the tokens of a shrinking grid, each later stage opened by an attention with subsampling.
LeViT has no LayerNorm: every Linear and conv is followed by a BatchNorm (timm's ``LinearNorm`` / ``ConvNorm``:
``linear`` then ``bn``), and the classifiers normalise their input with one (``NormLinear``: ``bn`` then
``linear``).

Every BatchNorm is folded first, the deployed form of the model (timm's ``fuse``): into the ``linear`` before it
(:func:`~vitq.models.base.fold_batchnorm`), and in the classifiers into the ``linear`` after it (the pooled tokens
before it come from a residual sum and a mean, nothing a BatchNorm folds into). Each ``bn`` becomes an
``nn.Identity``. The quantization points then are (timm module names; role of the input in brackets):

- stem: ``stem.conv1.linear`` (``image``), ``stem.conv2.linear``, ``stem.conv3.linear``, ``stem.conv4.linear``
  (``act``, after Hardswish);
- blocks ``stages.{i}.blocks.{j}``: ``.attn.qkv.linear`` (``act``: the residual stream, no norm before it),
  ``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj.ln.linear`` (``act``, after Hardswish),
  ``.mlp.ln1.linear`` (``act``: the residual stream), ``.mlp.ln2.linear`` (``act``, after Hardswish);
- attention with subsampling ``stages.{i}.downsample.attn_downsample``: ``.kv.linear`` and ``.q_proj.ln.linear``
  (``act``: all tokens, and every ``stride``-th token), ``.q``, ``.k``, ``.v``, ``.softmax``,
  ``.proj.ln.linear`` (``act``); its MLP ``stages.{i}.downsample.mlp.ln1.linear``, ``.mlp.ln2.linear`` (``act``);
- ``head.linear`` and, in distilled models, ``head_dist.linear`` (``act``: the mean of the tokens).

Stays float: the learned attention biases (``attention_biases`` gathered by ``attention_bias_idxs``: constants of
the model, added to the scaled scores like a relative position bias), the Hardswish activations, the token
subsampling and the pooling. The ``q`` points see the unscaled queries: timm multiplies the product ``q·kᵀ`` by the
scale, and so does the quantized attention.

Tensor names: the folded layers gain a ``bias`` and the ``bn`` tensors are gone; the query module ``q`` of the
attention with subsampling is renamed ``q_proj`` (``q`` is the quantization point of its queries,
:class:`~vitq.nn.attention.QuantLevitAttentionDownsample`). Everything else keeps timm's names.

There is no LayerNorm → Linear fold pair (no LayerNorm); the reparameterizing methods run with nothing to fold.
Refused with one line: the conv mode (``use_conv=True``, timm's ``levit_conv_*``: the same weights as 1x1 convs
on NCHW maps; use the ``levit_*`` model).
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.base import ModelAdapter, Stage, fold_batchnorm, fold_batchnorm_into_next_linear, replace_module
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantLevitAttention, QuantLevitAttentionDownsample


@register_adapter("levit")
class LevitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.levit import Levit

        return isinstance(model, Levit)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        """Fold every BatchNorm (with the running statistics: the model's eval function), replace the attentions,
        then every conv and Linear by a quantization point."""
        from timm.models.levit import Attention, AttentionDownsample, ConvNorm, LinearNorm, NormLinear

        if model.use_conv:
            raise VitqError("LeViT in conv mode (use_conv=True, levit_conv_*) is not supported; "
                            "use the linear-mode model (levit_*), which has the same weights")
        for name, module in list(model.named_modules()):
            if isinstance(module, ConvNorm | LinearNorm):
                fold_batchnorm(model, f"{name}.linear", f"{name}.bn")
            elif isinstance(module, NormLinear):
                fold_batchnorm_into_next_linear(model, f"{name}.bn", f"{name}.linear")
        for name, module in list(model.named_modules()):
            if isinstance(module, AttentionDownsample):
                replace_module(model, name, QuantLevitAttentionDownsample(module))
            elif isinstance(module, Attention):
                replace_module(model, name, QuantLevitAttention(module))
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Conv2d):
                replace_module(model, name, QConv2d(module, "image" if name == "stem.conv1.linear" else "act"))
            elif isinstance(module, nn.Linear):
                replace_module(model, name, QLinear(module, "act"))

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``stem`` (the convs, then the NCHW map flattened into tokens, as timm's ``forward_features``); for each
        later stage its ``downsample`` (the attention with subsampling and its MLP); each block; ``head`` (mean
        of the tokens, classifier(s); a distilled model averages its two)."""

        def stem(x: torch.Tensor) -> torch.Tensor:
            return model.stem(x).flatten(2).transpose(1, 2)

        stages = [Stage("stem", ("stem",), stem)]
        for i, stage in enumerate(model.stages):
            if not isinstance(stage.downsample, nn.Identity):
                stages.append(Stage(f"stages.{i}.downsample", (f"stages.{i}.downsample",), stage.downsample))
            stages += [Stage(f"stages.{i}.blocks.{j}", (f"stages.{i}.blocks.{j}",), block)
                       for j, block in enumerate(stage.blocks)]
        return [*stages, Stage("head", ("head", "head_dist"), model.forward_head)]

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """None: LeViT has no LayerNorm (its BatchNorms are folded into the Linears)."""
        return []
