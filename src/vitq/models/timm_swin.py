"""Adapter for timm ``SwinTransformer`` models (Swin-T/S/B/L, v1).

Quantization points (names follow timm's module names):
``patch_embed.proj`` (conv; its input is the image); per stage ``layers.{i}.downsample.reduction``
(PatchMerging, input post-LayerNorm; stages 1..n only); per block ``layers.{i}.blocks.{j}.attn.qkv``,
``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``;
then ``head.fc``.

Stages: ``embed`` (patch embedding), then for each timm stage its ``downsample`` (when it is not an
``Identity``) followed by each of its blocks, then ``head`` (final norm, pooling, classifier).
This is exactly timm's ``SwinTransformerStage.forward`` order (downsample first, then blocks).
"""

from __future__ import annotations

from torch import nn

from vitq.models.base import ModelAdapter, Stage, affine_layernorm, replace_module, wrap_layernorms, wrap_mlp
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear, QuantWindowAttention


@register_adapter("swin")
class SwinAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(model, SwinTransformer)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        replace_module(model, "patch_embed.proj", QConv2d(model.patch_embed.proj, "image"))
        for i, layer in enumerate(model.layers):
            if not isinstance(layer.downsample, nn.Identity):
                replace_module(model, f"layers.{i}.downsample.reduction",
                               QLinear(layer.downsample.reduction, "post_ln"))
            for j, block in enumerate(layer.blocks):
                prefix = f"layers.{i}.blocks.{j}"
                replace_module(model, f"{prefix}.attn", QuantWindowAttention(block.attn))
                wrap_mlp(model, f"{prefix}.mlp")
        if isinstance(model.head.fc, nn.Linear):
            replace_module(model, "head.fc", QLinear(model.head.fc, "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        def head(x):
            return model.forward_head(model.norm(x))

        stages = [Stage("embed", ("patch_embed",), model.patch_embed)]
        for i, layer in enumerate(model.layers):
            if not isinstance(layer.downsample, nn.Identity):
                stages.append(Stage(f"layers.{i}.downsample", (f"layers.{i}.downsample",), layer.downsample))
            stages.extend(Stage(f"layers.{i}.blocks.{j}", (f"layers.{i}.blocks.{j}",), block)
                          for j, block in enumerate(layer.blocks))
        stages.append(Stage("head", ("norm", "head"), head))
        return stages

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """Per stage ``layers.{i}.downsample.norm`` → ``.downsample.reduction`` (PatchMerging: the 2×2
        concatenation happens *before* the norm, so the norm output is the reduction's input as is),
        then per block ``.norm1`` → ``.attn.qkv`` and ``.norm2`` → ``.mlp.fc1``.

        norm1 → qkv: between them timm only rolls (cyclic shift) and partitions the tokens into
        windows. Both only permute tokens and never mix channels, so a per-channel affine map of the
        norm1 output commutes with them and can be folded into qkv exactly. The exception is the
        zero padding of a resolution not divisible by the window: padded tokens are 0 *after* norm1,
        and would become ``W·0 + bias'`` ≠ ``bias`` once a shift is folded into qkv's bias; such
        blocks are left out.
        """
        pairs = []
        for i, layer in enumerate(model.layers):
            downsample = layer.downsample
            if not isinstance(downsample, nn.Identity) and affine_layernorm(getattr(downsample, "norm", None)):
                pairs.append((f"layers.{i}.downsample.norm", f"layers.{i}.downsample.reduction"))
            for j, block in enumerate(layer.blocks):
                prefix = f"layers.{i}.blocks.{j}"
                if affine_layernorm(block.norm1) and not _pads_windows(block):
                    pairs.append((f"{prefix}.norm1", f"{prefix}.attn.qkv"))
                if affine_layernorm(block.norm2):
                    pairs.append((f"{prefix}.norm2", f"{prefix}.mlp.fc1"))
        return pairs


def _pads_windows(block: nn.Module) -> bool:
    """Whether the block zero-pads its (fixed) input resolution up to a multiple of the window."""
    if getattr(block, "dynamic_mask", False):
        return True  # resolution only known at run time: assume it may pad
    resolution, window = tuple(block.input_resolution), tuple(block.window_size)
    return any(r % w for r, w in zip(resolution, window, strict=True))
