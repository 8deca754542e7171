"""Adapter for timm MobileViT v1 and v2 (``ByobNet`` models built with ``MobileVitBlock`` / ``MobileVitV2Block``):
a convolutional network of inverted-residual blocks in which some stages end with a block that unfolds its feature
map into patches, runs a small transformer over the patches and folds the result back.

BatchNorms are folded first (:func:`~vitq.models.base.fold_batchnorm`): every ``ConvNormAct`` computes
``act(conv'(x))`` with the BatchNorm's affine map in ``conv'``'s weight and bias, the deployed form of the network;
its ``bn`` becomes its activation alone. A quantized model's tensor names therefore differ from timm's there:
``*.bn.weight`` / ``.bias`` / ``.running_mean`` / ``.running_var`` are gone and ``*.conv.bias`` is new.

Quantization points (timm module names), with the role of each input:

- ``stem.conv`` (the image: ``image``);
- per inverted-residual block ``stages.{i}.{j}``: ``.conv1_1x1.conv`` (the block input), ``.conv2_kxk.conv``
  (depthwise) and ``.conv3_1x1.conv`` (SiLU outputs), all ``act``; a squeeze-excitation module's ``fc1`` / ``fc2``
  (timm's ``semobilevit_s`` config) are ``act``;
- per MobileViT v1 block: ``.conv_kxk.conv`` and ``.conv_1x1`` (``act``); per transformer block
  ``.transformer.{k}.attn.qkv`` (``post_ln``), ``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``,
  ``.attn.proj`` (``act``), ``.mlp.fc1`` (``post_ln``), ``.mlp.fc2`` (``act``: it reads a SiLU output, whose
  minimum −0.278 lies below the −0.170 the ``post_gelu`` quantizers are built for; ``post_gelu`` when the MLP's
  activation is a GELU); then ``.conv_proj.conv`` and ``.conv_fusion.conv`` (``act``, see below);
- per MobileViT v2 block: ``.conv_kxk.conv`` (depthwise) and ``.conv_1x1`` (``act``); per linear transformer block
  ``.transformer.{k}.attn.qkv_proj``, ``.attn.v``, ``.attn.softmax``, ``.attn.out_proj``, ``.mlp.fc1``,
  ``.mlp.fc2``; then ``.conv_proj.conv``; every input ``act``
  (:class:`~vitq.nn.attention.QuantLinearSelfAttention` says what ``v`` and ``softmax`` see);
- ``final_conv.conv`` (v1; ``act``) and ``head.fc`` (``act``).

The v1 transformer is timm's ViT ``Block`` over ``[batch·patch area, patches, dim]`` tokens and is wrapped as ViT's
(:class:`~vitq.nn.QuantAttention`); its LayerNorms, and the block's final ``norm``, become
:class:`~vitq.nn.QLayerNorm` points (``pre_ln``, float unless a method quantizes them).

What stays float, and why:

- ``conv_proj.conv`` reads the output of the block's final LayerNorm, folded back into a channels-first feature
  map: role ``act``, not ``post_ln``, because the post-LayerNorm quantizers and the LayerNorm → Linear fold work per
  channel along the last axis of a Linear's input, which is here the feature map's width. The pair is therefore not
  a fold pair either.
- v2 normalises with ``GroupNorm1`` (``GroupNorm`` with one group over ``[dim, patch area, patches]``): its
  statistics span every token of the image, it is not a per-token LayerNorm, and the 1×1 convolutions it feeds read
  it channels first. It cannot take the RepQ-style fold (which needs an ``nn.LayerNorm`` feeding a Linear), so
  ``qkv_proj`` and ``fc1`` have role ``act``, v2 blocks have no fold pair, and the GroupNorms stay float modules
  without an input point.
- Interpolation of a feature map whose size is not a multiple of the patch size, the unfold / fold reshapes, the
  residual additions and the pooling are not quantized (no product).

Stages: ``stem``, every block of every stage (``stages.{i}.{j}``: an inverted residual or a MobileViT block, whole),
``final_conv`` (when the model has one) and ``head`` (pooling and classifier).
"""

from __future__ import annotations

from torch import nn

from vitq.errors import VitqError
from vitq.models.base import (
    ModelAdapter,
    Stage,
    block_norm_pairs,
    fold_conv_batchnorms,
    replace_module,
    wrap_layernorms,
)
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear, QuantAttention, QuantPoint
from vitq.nn.attention import QuantLinearSelfAttention


def _mobilevit_blocks() -> tuple[type[nn.Module], ...]:
    from timm.models.mobilevit import MobileVitBlock, MobileVitV2Block

    return MobileVitBlock, MobileVitV2Block


@register_adapter("mobilevit")
class MobileVitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """A timm ``ByobNet`` with at least one MobileViT (v1 or v2) block: other ByobNets are CNNs."""
        from timm.models.byobnet import ByobNet

        blocks = _mobilevit_blocks()
        return isinstance(model, ByobNet) and any(isinstance(m, blocks) for m in model.modules())

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        from timm.models.mobilevit import MobileVitBlock

        _check_supported(model)
        fold_conv_batchnorms(model)
        first = next(name for name, m in model.stem.named_modules() if isinstance(m, nn.Conv2d))
        replace_module(model, f"stem.{first}", QConv2d(model.stem.get_submodule(first), "image"))
        for i, stage in enumerate(model.stages):
            for j, block in enumerate(stage):
                if not isinstance(block, _mobilevit_blocks()):
                    continue
                for k, layer in enumerate(block.transformer):
                    path = f"stages.{i}.{j}.transformer.{k}"
                    if isinstance(block, MobileVitBlock):
                        replace_module(model, f"{path}.attn", QuantAttention(layer.attn))
                        replace_module(model, f"{path}.mlp.fc1", QLinear(layer.mlp.fc1, "post_ln"))
                        replace_module(model, f"{path}.mlp.fc2", QLinear(layer.mlp.fc2, _hidden_role(layer.mlp)))
                    else:
                        replace_module(model, f"{path}.attn", QuantLinearSelfAttention(layer.attn))
        # every other convolution and Linear reads an activation, a block input or a pooled feature
        for name, module in list(model.named_modules()):
            if _inside_point(model, name):
                continue
            if isinstance(module, nn.Conv2d):
                replace_module(model, name, QConv2d(module, "act"))
            elif isinstance(module, nn.Linear):
                replace_module(model, name, QLinear(module, "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``stem``, each block ``stages.{i}.{j}``, ``final_conv`` (unless it is an ``Identity``), ``head``: the
        order of timm's ``ByobNet.forward`` (``stages`` is a ``Sequential`` of ``Sequential`` s)."""
        stages = [Stage("stem", ("stem",), model.stem)]
        stages += [Stage(f"stages.{i}.{j}", (f"stages.{i}.{j}",), block)
                   for i, stage in enumerate(model.stages) for j, block in enumerate(stage)]
        if not isinstance(model.final_conv, nn.Identity):
            stages.append(Stage("final_conv", ("final_conv",), model.final_conv))
        stages.append(Stage("head", ("head",), model.forward_head))
        return stages

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """Per v1 transformer block ``norm1`` → ``attn.qkv`` and ``norm2`` → ``mlp.fc1`` (timm's ViT blocks, over the
        tokens of the unfolded patches). A v1 block's final ``norm`` feeds ``conv_proj`` channels first, and v2
        normalises with ``GroupNorm1``: neither is listed (see the module docstring)."""
        from timm.models.mobilevit import MobileVitBlock

        pairs = []
        for i, stage in enumerate(model.stages):
            for j, block in enumerate(stage):
                if isinstance(block, MobileVitBlock):
                    for k in range(len(block.transformer)):
                        pairs += block_norm_pairs(model, f"stages.{i}.{j}.transformer.{k}")
        return pairs


def _hidden_role(mlp: nn.Module) -> str:
    """The role of an MLP's ``fc2`` input: ``post_gelu`` after a GELU, else ``act`` (SiLU, MobileViT's default,
    goes lower than GELU's floor)."""
    return "post_gelu" if isinstance(mlp.act, nn.GELU) else "act"


def _inside_point(model: nn.Module, name: str) -> bool:
    """Whether the module at ``name`` is, or lies inside, a quantization point or a wrapped attention."""
    from vitq.nn import QuantAttentionBase

    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        if isinstance(model.get_submodule(".".join(parts[:end])), QuantPoint | QuantAttentionBase):
            return True
    return False


def _check_supported(model: nn.Module) -> None:
    """Raise a one-line :class:`~vitq.errors.VitqError` for what the adapter does not handle: block types other
    than inverted residuals and MobileViT blocks, convolutions with dynamic ("same") padding, and heads other than
    timm's ``ClassifierHead`` (pooling and one classifier layer)."""
    from timm.layers import ClassifierHead
    from timm.models.byobnet import BottleneckBlock

    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            if not isinstance(block, (BottleneckBlock, *_mobilevit_blocks())):
                raise VitqError(f"mobilevit adapter: block stages.{i}.{j} is a {type(block).__name__}; only "
                                "inverted-residual (BottleneckBlock) and MobileViT blocks are supported")
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d:
            raise VitqError(f"mobilevit adapter: {name} is a {type(module).__name__} (dynamic padding), "
                            "only plain Conv2d layers are supported")
    if not isinstance(model.head, ClassifierHead):
        raise VitqError(f"mobilevit adapter: the {type(model.head).__name__} head is not supported")
