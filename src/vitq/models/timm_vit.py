"""Adapter for timm ``VisionTransformer`` models (ViT, DeiT, DeiT-III, ...).

Quantization points (names are the public contract, see DESIGN.md):
``patch_embed.proj`` (conv; its input is the image), and per block ``blocks.{i}.attn.qkv``,
``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj``, ``.mlp.fc1``,
``.mlp.fc2``, then ``head`` (and ``head_dist``, the distillation head of distilled DeiT).
"""

from __future__ import annotations

from torch import nn

from vitq.models.base import (
    ModelAdapter,
    Stage,
    block_norm_pairs,
    replace_module,
    wrap_layernorms,
    wrap_mlp,
)
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear, QuantAttention


@register_adapter("vit")
class VitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        replace_module(model, "patch_embed.proj", QConv2d(model.patch_embed.proj, "image"))
        for i, block in enumerate(model.blocks):
            replace_module(model, f"blocks.{i}.attn", QuantAttention(block.attn))
            wrap_mlp(model, f"blocks.{i}.mlp")
        for head in ("head", "head_dist"):  # head_dist: the distillation head of DeiT's distilled models
            if isinstance(getattr(model, head, None), nn.Linear):
                replace_module(model, head, QLinear(getattr(model, head), "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        def embed(x):
            return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

        def head(x):
            return model.forward_head(model.norm(x))

        return [
            Stage("embed", ("patch_embed", "norm_pre"), embed),
            *(Stage(f"blocks.{i}", (f"blocks.{i}",), block) for i, block in enumerate(model.blocks)),
            Stage("head", ("norm", "attn_pool", "fc_norm", "head", "head_dist"), head),
        ]

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """``blocks.{i}.norm1`` → ``blocks.{i}.attn.qkv``, ``blocks.{i}.norm2`` → ``blocks.{i}.mlp.fc1`` and, in
        MLPs that normalise their hidden activation, ``.mlp.norm`` → ``.mlp.fc2``.

        Only affine ``nn.LayerNorm`` norms are listed (other norms cannot take the fold)."""
        return [pair for i in range(len(model.blocks)) for pair in block_norm_pairs(model, f"blocks.{i}")]
