"""Adapter for timm ``Cait`` models (CaiT): LayerScale blocks with talking-heads self-attention over the patch
tokens, then class-attention blocks (``blocks_token_only``) in which only the class token attends to
``cat(class token, patch tokens)`` and is updated, then the final norm and the classifier.

Quantization points (the ViT names): ``patch_embed.proj`` (conv; its input is the image); per block
``blocks.{i}.attn.qkv``, ``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj``, ``.mlp.fc1``,
``.mlp.fc2``; per class-attention block ``blocks_token_only.{j}.attn.qkv``, ``.attn.q``, ``.attn.k``, ``.attn.v``,
``.attn.softmax``, ``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``; then ``head``.

Talking heads (:class:`~vitq.nn.attention.QuantTalkingHeadAttention`): the head mixes ``proj_l`` (on the scores) and
``proj_w`` (on the probabilities) stay float; the ``softmax`` point quantizes the probabilities before ``proj_w``.
Class attention (:class:`~vitq.nn.attention.QuantClassAttention`): timm's separate ``q`` / ``k`` / ``v`` Linears
are stacked into one ``blocks_token_only.{j}.attn.qkv`` Linear, so the point names match ViT's and a quantized
model's tensor names differ from timm's there (``attn.q.weight`` → rows of ``attn.qkv.weight``, ...). Everything
else keeps timm's names.

Roles: ``qkv`` and ``fc1`` read a LayerNorm output (``post_ln``), ``fc2`` a GELU output (``post_gelu``), ``proj``
and ``head`` ``act``.
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.models.base import ModelAdapter, Stage, block_norm_pairs, replace_module, wrap_layernorms, wrap_mlp
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantClassAttention, QuantTalkingHeadAttention


@register_adapter("cait")
class CaitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.cait import Cait

        return isinstance(model, Cait)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        replace_module(model, "patch_embed.proj", QConv2d(model.patch_embed.proj, "image"))
        for i, block in enumerate(model.blocks):
            replace_module(model, f"blocks.{i}.attn", QuantTalkingHeadAttention(block.attn))
            wrap_mlp(model, f"blocks.{i}.mlp")
        wrap_class_attention_blocks(model, "blocks_token_only")
        if isinstance(model.head, nn.Linear):
            replace_module(model, "head", QLinear(model.head, "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``embed`` (patch embedding + absolute positions; CaiT adds no class token here), each block, ``cls_token``
        (prepends the learned class token: no quantization point), each class-attention block, ``head`` (final norm,
        pooling, classifier).

        timm's class-attention blocks take ``(patch tokens, class token)`` and return the new class token; here each
        maps ``cat(class token, patch tokens)`` to ``cat(new class token, patch tokens)``, one tensor to one tensor,
        and the last one's output is what timm's ``forward_cls`` returns."""

        def embed(x: torch.Tensor) -> torch.Tensor:
            return model.pos_drop(model.patch_embed(x) + model.pos_embed)

        def prepend_cls_token(x: torch.Tensor) -> torch.Tensor:
            return torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)

        def class_attention(block: nn.Module):
            def run(x: torch.Tensor) -> torch.Tensor:
                tokens = x[:, 1:]
                return torch.cat((block(tokens, x[:, :1]), tokens), dim=1)

            return run

        def head(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(x))

        # no class token in a model pruned by timm's prune_intermediate_layers (no class-attention blocks either)
        cls_token = [Stage("cls_token", (), prepend_cls_token)] if model.blocks_token_only is not None else []
        return [
            Stage("embed", ("patch_embed",), embed),
            *(Stage(f"blocks.{i}", (f"blocks.{i}",), block) for i, block in enumerate(model.blocks)),
            *cls_token,
            *(Stage(f"blocks_token_only.{j}", (f"blocks_token_only.{j}",), class_attention(block))
              for j, block in enumerate(class_attention_blocks(model, "blocks_token_only"))),
            Stage("head", ("norm", "head"), head),
        ]

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """Per block and per class-attention block ``norm1`` → ``attn.qkv`` and ``norm2`` → ``mlp.fc1``.

        In a class-attention block ``norm1`` normalises ``cat(class token, patch tokens)`` and its output is the
        stacked ``qkv``'s whole input (q is computed for every token, only the class token's row is used), and
        ``norm2`` normalises the class token, ``fc1``'s whole input. ``norm`` → ``head`` is left out as in ViT: the
        classifier input has role ``act``."""
        paths = [f"blocks.{i}" for i in range(len(model.blocks))]
        paths += [f"blocks_token_only.{j}" for j in range(len(class_attention_blocks(model, "blocks_token_only")))]
        return [pair for path in paths for pair in block_norm_pairs(model, path)]


def class_attention_blocks(model: nn.Module, attr: str) -> nn.ModuleList | list:
    """The class-attention blocks ``model.<attr>`` (CaiT's ``blocks_token_only``, XCiT's ``cls_attn_blocks``), or
    ``[]`` when timm's ``prune_intermediate_layers`` removed them."""
    blocks = getattr(model, attr)
    return blocks if blocks is not None else []


def wrap_class_attention_blocks(model: nn.Module, attr: str) -> None:
    """Wrap each class-attention block of ``model.<attr>``: its attention and its MLP."""
    for j, block in enumerate(class_attention_blocks(model, attr)):
        replace_module(model, f"{attr}.{j}.attn", QuantClassAttention(block.attn))
        wrap_mlp(model, f"{attr}.{j}.mlp")
