"""Adapter for timm ``Beit`` models (BEiT, BEiT v2): ViT blocks with LayerScale, relative position bias
(per block, or one table shared by all blocks) and separate q/v biases.

Quantization points (the ViT names): ``patch_embed.proj``; per block ``blocks.{i}.attn.qkv``, ``.attn.q``,
``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``; then ``head``.
BEiT's q/v biases become ``blocks.{i}.attn.qkv.bias`` (:func:`vitq.nn.attention.merged_qkv`), so a quantized
model's tensor names differ from timm's there. The relative position bias is added to the scores in float
before the softmax point, as in timm.
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.models.base import ModelAdapter, Stage, block_norm_pairs, replace_module, wrap_layernorms, wrap_mlp
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantRelPosAttention


@register_adapter("beit")
class BeitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.beit import Beit

        return isinstance(model, Beit)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        replace_module(model, "patch_embed.proj", QConv2d(model.patch_embed.proj, "image"))
        for i, block in enumerate(model.blocks):
            replace_module(model, f"blocks.{i}.attn", QuantRelPosAttention(block.attn))
            wrap_mlp(model, f"blocks.{i}.mlp")
        if isinstance(model.head, nn.Linear):
            replace_module(model, "head", QLinear(model.head, "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``embed`` (patch embedding, class token, absolute positions), each block, ``head`` (final norm,
        pooling, ``fc_norm``, classifier). A shared relative position bias is recomputed from its table by each
        block's stage, as timm's forward computes it once and hands it to every block."""

        def embed(x):
            x = model.patch_embed(x)
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if model.pos_embed is not None:
                x = x + model.pos_embed
            return model.pos_drop(x)

        def block_run(block):
            def run(x):
                shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
                return block(x, shared_rel_pos_bias=shared)

            return run

        def head(x):
            return model.forward_head(model.norm(x))

        return [
            Stage("embed", ("patch_embed",), embed),
            *(Stage(f"blocks.{i}", (f"blocks.{i}",), block_run(block)) for i, block in enumerate(model.blocks)),
            Stage("head", ("norm", "fc_norm", "head"), head),
        ]

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """Per block ``norm1`` → ``attn.qkv`` and ``norm2`` → ``mlp.fc1`` (plus ``mlp.norm`` → ``mlp.fc2`` in
        ``scale_mlp`` variants). ``fc_norm`` → ``head`` is left out as
        ViT's ``norm`` → ``head`` is: the classifier input has role ``act``, not ``post_ln``."""
        return [pair for i in range(len(model.blocks)) for pair in block_norm_pairs(model, f"blocks.{i}")]
