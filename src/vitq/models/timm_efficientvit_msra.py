"""Adapter for timm ``EfficientVitMsra`` models (EfficientViT M0-M5, Liu et al. 2023): a four-conv patch embedding,
then stages of sandwich blocks (depthwise conv, conv FFN, cascaded group attention over local windows, depthwise
conv, conv FFN, each residual), with a subsampling block between stages, then average pooling and a
BatchNorm → Linear classifier.

BatchNorms are folded first, the deployed form of the network (timm's ``fuse``): each ``ConvNorm``'s BatchNorm
into its convolution (:func:`~vitq.models.base.fold_batchnorm`; ``bn`` becomes an ``Identity``), and the
classifier's ``head.bn`` (a BatchNorm1d before the Linear) into ``head.linear`` after it. A quantized model's
tensor names therefore differ from timm's there: the ``*.bn.*`` tensors are gone, ``*.conv.bias`` is new and
``head.linear`` holds the folded classifier.

Quantization points (timm module names; every convolution is a ``ConvNorm``'s ``conv``):

- ``patch_embed.conv1.conv`` (the image: ``image``), ``.conv2.conv`` … ``.conv4.conv`` (ReLU outputs: ``act``);
- per sandwich block ``stages.{i}.blocks.{j}``: ``.dw0.m.conv`` and ``.dw1.m.conv`` (depthwise, the residual
  stream), ``.ffn0.m.pw1.conv`` / ``.ffn1.m.pw1.conv`` (the stream) and ``.pw2.conv`` (a ReLU output); the mixer
  ``.mixer.m.attn`` (:class:`~vitq.nn.attention.QuantCascadedGroupAttention`): per head ``h``
  ``.qkvs.{h}.conv`` (a channel group of the stream plus the previous head's output), ``.dws.{h}.conv`` (the
  depthwise conv on q), ``.heads.{h}.q``, ``.heads.{h}.k``, ``.heads.{h}.v``, ``.heads.{h}.softmax``, then
  ``.proj.1.conv`` (the ReLU of the concatenated heads); every conv input ``act``;
- per subsampling ``stages.{i}.downsample``: ``.res1`` / ``.res2`` (a depthwise conv and a conv FFN, as above),
  ``.patchmerge.conv1.conv``, ``.conv2.conv`` (depthwise, stride 2), ``.se.fc1``, ``.se.fc2`` (the
  squeeze-excitation convs) and ``.conv3.conv``; every input ``act``;
- ``head.linear`` (the pooled features, ``act``).

The ``heads.{h}`` modules are new (timm computes the heads inline); they hold no tensor. Each head's attention is
``softmax(Q(q·scale) Q(k)ᵀ + bias) → Q → @ Q(v)`` over the pixels of one window, the ``q`` point after the
depthwise conv on q, as timm computes it.

What stays float: the attention bias (a learned table per pixel offset, gathered by a fixed index: it depends on
no input and is added to the scores before the softmax point), the squeeze-excitation gate (a sigmoid of
``se.fc2``'s output that multiplies the features), the residual additions, the window partition and its padding,
and the pooling. There is no LayerNorm, hence no fold pair; the reparameterizing methods run with nothing to fold.

Stages: ``patch_embed``, then per timm stage its ``downsample`` (when it is not an ``Identity``) and each block
``stages.{i}.blocks.{j}``, then ``head`` (pooling and classifier).
"""

from __future__ import annotations

from torch import nn

from vitq.errors import VitqError
from vitq.models.base import ModelAdapter, Stage, fold_batchnorm_into_next_linear, fold_conv_batchnorms, replace_module
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantCascadedGroupAttention


@register_adapter("efficientvit_msra")
class EfficientVitMsraAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.efficientvit_msra import EfficientVitMsra

        return isinstance(model, EfficientVitMsra)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        from timm.models.efficientvit_msra import CascadedGroupAttention, NormLinear

        if isinstance(model.head, NormLinear):
            fold_batchnorm_into_next_linear(model, "head.bn", "head.linear")
        elif not isinstance(model.head, nn.Identity):
            raise VitqError(f"efficientvit_msra adapter: the {type(model.head).__name__} head is not supported")
        fold_conv_batchnorms(model)
        for name, module in list(model.named_modules()):
            if isinstance(module, CascadedGroupAttention):
                replace_module(model, name, QuantCascadedGroupAttention(module))
        replace_module(model, "patch_embed.conv1.conv", QConv2d(model.patch_embed.conv1.conv, "image"))
        # every other convolution reads a ReLU output, the residual stream or a pooled feature
        for name, module in list(model.named_modules()):
            if type(module) is nn.Conv2d:
                replace_module(model, name, QConv2d(module, "act"))
        if isinstance(model.head, NormLinear):
            replace_module(model, "head.linear", QLinear(model.head.linear, "act"))

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``patch_embed``; per stage ``stages.{i}.downsample`` (unless it is an ``Identity``) and each block
        ``stages.{i}.blocks.{j}``; ``head`` (pooling and classifier): the order of timm's forward."""
        stages = [Stage("patch_embed", ("patch_embed",), model.patch_embed)]
        for i, stage in enumerate(model.stages):
            if not isinstance(stage.downsample, nn.Identity):
                stages.append(Stage(f"stages.{i}.downsample", (f"stages.{i}.downsample",), stage.downsample))
            stages += [Stage(f"stages.{i}.blocks.{j}", (f"stages.{i}.blocks.{j}",), block)
                       for j, block in enumerate(stage.blocks)]
        stages.append(Stage("head", ("head",), model.forward_head))
        return stages

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """None: EfficientViT (MSRA) has no LayerNorm (its BatchNorms are folded into the convolutions)."""
        return []
