"""Adapter for timm ``EfficientVit`` and ``EfficientVitLarge`` models (EfficientViT B0-B3 and L1-L3, MIT, Cai et
al.): a stem (a stride-2 conv, then depthwise-separable residual blocks), stages of MBConv blocks (fused MBConv in
the L series), the last stage(s) of EfficientViT blocks (a LiteMLA multi-scale ReLU linear attention, then an
MBConv, each residual), then a classifier head (1×1 conv, pooling, Linear → LayerNorm → activation → Linear).
Hardswish activations in the B series, tanh-approximated GELU in the L series.

BatchNorms are folded first, the deployed form of the network: each ``ConvNormAct``'s ``norm`` (when it is a
BatchNorm; blocks with ``fewer_norm`` have none) into its ``conv``
(:func:`~vitq.models.base.fold_conv_batchnorms`), the ``norm`` becoming an ``nn.Identity``. A quantized model's
tensor names therefore differ from timm's there: the ``*.norm.*`` BatchNorm tensors are gone and ``*.conv.bias``
is new where the conv had none.

Quantization points (timm module names; every convolution is a ``ConvNormAct``'s ``conv`` except LiteMLA's
``aggreg`` convolutions), with the role of each input:

- ``stem.in_conv.conv`` (the image: ``image``); the stem's residual blocks ``stem.res{j}.main``:
  ``.depth_conv.conv`` (depthwise) and ``.point_conv.conv`` (B), ``.conv1.conv`` and ``.conv2.conv`` (L);
- per MBConv block ``stages.{i}.blocks.{j}.main`` (and the ``local_module.main`` of an EfficientViT block):
  ``.inverted_conv.conv``, ``.depth_conv.conv`` (depthwise), ``.point_conv.conv``; per fused MBConv (L):
  ``.spatial_conv.conv``, ``.point_conv.conv``;
- per EfficientViT block ``stages.{i}.blocks.{j}.context_module.main``
  (:class:`~vitq.nn.attention.QuantLiteMLA`): ``.qkv.conv``, ``.aggreg.{s}.0`` (depthwise 5×5) and
  ``.aggreg.{s}.1`` (1×1 grouped per head), then the attention points ``.q``, ``.k`` (``attn_q``, ``attn_k``:
  after the ReLU kernel), ``.v`` and ``.kv`` (``attn_v``: v, and the product relu(k)ᵀ·v that relu(q) multiplies),
  then ``.proj.conv``;
- ``head.in_conv.conv``, ``head.classifier.0`` (the pooled features) and ``head.classifier.4`` (``post_gelu``
  after the L series' GELU, else ``act``: Hardswish goes down to −0.375, below the GELU floor the ``post_gelu``
  quantizers are built for).

Every other input is ``act``: the residual stream, an activation output or the qkv maps. There is no softmax
(:class:`~vitq.nn.attention.QuantLiteMLA` says why and what its points see). The head's LayerNorm
``head.classifier.1`` becomes a :class:`~vitq.nn.QLayerNorm` (``pre_ln``, float unless a method quantizes it).

What stays float: the ReLU kernel, the normaliser of the linear attention (the sum of the quantized k times the
quantized q, exact in integer arithmetic) and the division by it, the activations, the residual additions and
the pooling.

There is no LayerNorm → Linear fold pair: the one LayerNorm (``head.classifier.1``) feeds ``head.classifier.4``
through a Hardswish or GELU, and no per-channel scale of its output commutes with that; every other norm is a
BatchNorm, folded into its convolution. The reparameterizing methods run with nothing to fold.

Stages: ``stem``, each block ``stages.{i}.blocks.{j}`` (an EfficientViT block whole: its attention and its
MBConv), then ``head`` (conv, pooling and classifier): the order of timm's forward.
"""

from __future__ import annotations

from torch import nn

from vitq.models.base import ModelAdapter, Stage, fold_conv_batchnorms, replace_module, wrap_layernorms
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantLiteMLA


@register_adapter("efficientvit_mit")
class EfficientVitMitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.efficientvit_mit import EfficientVit, EfficientVitLarge

        return isinstance(model, EfficientVit | EfficientVitLarge)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        from timm.models.efficientvit_mit import LiteMLA

        fold_conv_batchnorms(model, norm="norm")
        for name, module in list(model.named_modules()):
            if isinstance(module, LiteMLA):
                replace_module(model, name, QuantLiteMLA(module))
        replace_module(model, "stem.in_conv.conv", QConv2d(model.stem.in_conv.conv, "image"))
        # every other convolution reads the residual stream or an activation output
        for name, module in list(model.named_modules()):
            if type(module) is nn.Conv2d:
                replace_module(model, name, QConv2d(module, "act"))
        classifier = model.head.classifier
        for i, layer in enumerate(classifier):
            if isinstance(layer, nn.Linear):
                role = "post_gelu" if i == len(classifier) - 1 and _is_gelu(classifier[2]) else "act"
                classifier[i] = QLinear(layer, role)
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``stem``; each block ``stages.{i}.blocks.{j}``; ``head``: the order of timm's forward."""
        stages = [Stage("stem", ("stem",), model.stem)]
        stages += [Stage(f"stages.{i}.blocks.{j}", (f"stages.{i}.blocks.{j}",), block)
                   for i, stage in enumerate(model.stages) for j, block in enumerate(stage.blocks)]
        stages.append(Stage("head", ("head",), model.forward_head))
        return stages

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """None: the head's LayerNorm reaches its Linear through an activation, and every other norm is a BatchNorm
        folded into its convolution (see the module docstring)."""
        return []


def _is_gelu(module: nn.Module) -> bool:
    """Whether ``module`` is a GELU (the L series' tanh-approximated one included)."""
    from timm.layers import GELUTanh

    return isinstance(module, nn.GELU | GELUTanh)
