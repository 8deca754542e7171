"""Adapter for timm ``TinyVit`` models (TinyViT): a convolutional stem and first stage of MBConv blocks, then
stages of windowed-attention blocks, each stage opened by a convolutional patch merging.

Every BatchNorm (all inside timm's ``ConvNorm``: ``conv`` then ``bn``) is folded into its ``conv`` first
(:func:`~vitq.models.base.fold_batchnorm`), the deployed form of the model; the ``bn`` becomes an ``nn.Identity``.
The quantization points then are (timm module names; role of the input in brackets):

- stem: ``patch_embed.conv1.conv`` (``image``), ``patch_embed.conv2.conv`` (``act``, after GELU);
- MBConv blocks ``stages.0.blocks.{j}``: ``.conv1.conv`` (``act``: the residual stream), ``.conv2.conv``
  (depthwise 3x3, ``act`` after GELU), ``.conv3.conv`` (``act`` after GELU);
- patch merging ``stages.{i}.downsample``: ``.conv1.conv``, ``.conv2.conv`` (depthwise, stride 2), ``.conv3.conv``,
  all ``act``;
- attention blocks ``stages.{i}.blocks.{j}``: ``.attn.qkv`` (``post_ln``: the attention's own LayerNorm
  ``attn.norm`` comes first), ``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj`` (``act``),
  ``.local_conv.conv`` (depthwise 3x3 on the residual stream, ``act``), ``.mlp.fc1`` (``post_ln``: the MLP's
  own LayerNorm ``mlp.norm`` comes first), ``.mlp.fc2`` (``post_gelu``);
- ``head.fc`` (``act``).

The token LayerNorms ``attn.norm`` and ``mlp.norm`` become :class:`~vitq.nn.QLayerNorm` (role ``pre_ln``, float by
default). Stays float: the learned attention biases (``attention_biases`` gathered by ``attention_bias_idxs``, a
per-head table indexed by the offset between two window positions: a constant of the model, added to the scores
like Swin's relative position bias), the head's ``LayerNorm2d`` over the pooled features (it normalises channels
of an NCHW map, which :class:`~vitq.nn.QLayerNorm` does not do), the activations and the pooling.

Tensor names: the folded ``conv`` layers gain a ``bias`` and the ``bn`` tensors are gone
(``...conv1.bn.running_mean`` etc.); everything else keeps timm's names. The ``qkv`` rows keep timm's layout:
per head, ``key_dim`` query rows, ``key_dim`` key rows and ``val_dim`` value rows.

Windows: blocks whose input is larger than their window partition it (zero-padding it first when the size is not a
multiple of the window, as timm does; the padded tokens take part in the attention of their window). The adapter
leaves that to timm's block forward: only the attention itself is replaced.
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.models.base import ModelAdapter, Stage, affine_layernorm, fold_batchnorm, replace_module
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLayerNorm, QLinear
from vitq.nn.attention import QuantTinyVitAttention


@register_adapter("tinyvit")
class TinyVitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.tiny_vit import TinyVit

        return isinstance(model, TinyVit)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        """Fold every BatchNorm into its conv (with the running statistics: the model's eval function), then
        replace the convs, Linears, attentions and token LayerNorms by quantization points."""
        from timm.layers import LayerNorm2d
        from timm.models.tiny_vit import ConvNorm, TinyVitBlock

        conv_norms = [name for name, module in model.named_modules() if isinstance(module, ConvNorm)]
        for name in conv_norms:
            fold_batchnorm(model, f"{name}.conv", f"{name}.bn")
        for name in conv_norms:
            role = "image" if name == "patch_embed.conv1" else "act"
            replace_module(model, f"{name}.conv", QConv2d(model.get_submodule(f"{name}.conv"), role))
        for name, module in list(model.named_modules()):
            if isinstance(module, TinyVitBlock):
                replace_module(model, f"{name}.attn", QuantTinyVitAttention(module.attn))
                replace_module(model, f"{name}.mlp.fc1", QLinear(module.mlp.fc1, "post_ln"))
                replace_module(model, f"{name}.mlp.fc2", QLinear(module.mlp.fc2, "post_gelu"))
        if isinstance(model.head.fc, nn.Linear):
            replace_module(model, "head.fc", QLinear(model.head.fc, "act"))
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNorm2d | QLayerNorm):
                replace_module(model, name, QLayerNorm(module))

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``patch_embed``; each MBConv block of the first stage (NCHW); for each later stage its patch merging
        (``stages.{i}.downsample``, NCHW in, NHWC out, as timm's stage permutes after it) and each attention block
        (NHWC); ``head`` (back to NCHW, then pooling, LayerNorm2d, classifier). The layout changes are the
        permutations timm's stages apply, on the same tensors, so the composition is timm's forward exactly."""
        from timm.models.tiny_vit import TinyVitStage

        stages = [Stage("patch_embed", ("patch_embed",), model.patch_embed)]
        channels_last = False  # layout of the tensor handed on: NHWC after the first attention stage
        for i, stage in enumerate(model.stages):
            if isinstance(stage, TinyVitStage):
                stages.append(Stage(f"stages.{i}.downsample", (f"stages.{i}.downsample",),
                                    _merge_patches(stage.downsample, channels_last)))
                channels_last = True
            stages += [Stage(f"stages.{i}.blocks.{j}", (f"stages.{i}.blocks.{j}",), block)
                       for j, block in enumerate(stage.blocks)]

        def head(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(_to_nchw(x) if channels_last else x)

        return [*stages, Stage("head", ("head",), head)]

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """Per attention block ``attn.norm`` → ``attn.qkv`` (the attention normalises its input itself; the
        window padding happens before, so the norm's output is qkv's whole input) and ``mlp.norm`` →
        ``mlp.fc1``. The head's ``LayerNorm2d`` → ``head.fc`` is left out, as ViT's ``norm`` → ``head``."""
        from timm.models.tiny_vit import TinyVitBlock

        pairs = []
        for name, module in model.named_modules():
            if isinstance(module, TinyVitBlock):
                for norm, linear in (("attn.norm", "attn.qkv"), ("mlp.norm", "mlp.fc1")):
                    if affine_layernorm(module.get_submodule(norm)):
                        pairs.append((f"{name}.{norm}", f"{name}.{linear}"))
        return pairs


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _merge_patches(downsample: nn.Module, channels_last: bool):
    """The patch-merging stage: NCHW (or the previous attention stage's NHWC, permuted back as timm's stage does)
    → ``downsample`` → NHWC."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return downsample(_to_nchw(x) if channels_last else x).permute(0, 2, 3, 1)

    return run
