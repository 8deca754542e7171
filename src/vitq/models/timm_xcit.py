"""Adapter for timm ``Xcit`` models (XCiT): a convolutional patch embedding, blocks of cross-covariance attention
(XCA, attention over channels) + local patch interaction (LPI, two depthwise 3×3 convs) + MLP, then CaiT-style
class-attention blocks, the final norm and the classifier.

Quantization points: the patch-embedding convs ``patch_embed.proj.{2i}.0`` (the first one's input is the image, role
``image``; the later ones read a GELU output, role ``act``); per XCA block ``blocks.{i}.attn.qkv``, ``.attn.q``,
``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj``, ``.local_mp.conv1``, ``.local_mp.conv2``, ``.mlp.fc1``,
``.mlp.fc2``; per class-attention block ``cls_attn_blocks.{j}.attn.qkv``, ``.attn.q``, ``.attn.k``, ``.attn.v``,
``.attn.softmax``, ``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``; then ``head``.

Cross-covariance attention (:class:`~vitq.nn.attention.QuantXCAttention`): per head, q, k and v are
[channels, tokens]; the ``q`` and ``k`` points see q and k after their L2 normalisation over the tokens (the operands
of the score product), the per-head ``temperature`` multiplies the [channels × channels] scores after the product,
in float (as Swin v2's logit scale), and the ``softmax`` point quantizes the channel-attention map that multiplies v.

Roles: ``qkv`` and ``fc1`` read a LayerNorm output (``post_ln``), ``fc2`` a GELU output (``post_gelu``), ``proj``
and ``head`` ``act``. The LPI convs read images of tokens ([B, C, H, W]): ``conv1`` reads ``norm3``'s output and
``conv2`` the BatchNorm after the GELU; both have role ``act`` (``post_ln`` labels token × channel rows, which a
conv input is not). Both are depthwise (``groups = channels``).

What stays float, and why:

- the BatchNorms of the patch embedding are folded into the conv before each of them
  (:func:`~vitq.models.base.fold_batchnorm`), so the quantized weights are the ones the deployed model uses;
- LPI's BatchNorm comes after its GELU and before the zero-padded ``conv2``. Folding it into ``conv1`` would cross
  the GELU; folding it into ``conv2`` would turn its shift into a bias that the zero padding does not see at the
  border pixels. It stays a float per-channel affine map between the two convs;
- the Fourier positional encoding (``pos_embed``, a 1×1 conv ``token_projection`` over a fixed sin/cos grid) depends
  on no input: its output is a constant of the model for a given grid, added to the tokens in float;
- the per-head ``temperature`` and the class token, as constants of the model.

Tensor names differ from timm's ``state_dict`` in two places: each patch-embedding BatchNorm
``patch_embed.proj.{2i}.1.*`` is gone (folded: ``patch_embed.proj.{2i}.0`` gains a ``bias``), and the class
attention's separate ``attn.q`` / ``attn.k`` / ``attn.v`` become one ``cls_attn_blocks.{j}.attn.qkv``
(:func:`~vitq.nn.attention.stacked_linear`, as in the CaiT adapter). Everything else keeps timm's names.

Stages: ``embed`` (patch embedding and positional encoding) returns the tokens as an image [B, C, Hp, Wp], and each
XCA block maps that image to the next one, so that the blocks know the token grid (LPI needs it) whatever the image
size (timm's XCiT takes any multiple of the patch size); ``cls_token`` flattens the grid into tokens and prepends the
class token (no quantization point); then each class-attention block and ``head`` (final norm, pooling, classifier).
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.models.base import (
    ModelAdapter,
    Stage,
    block_norm_pairs,
    fold_batchnorm,
    replace_module,
    wrap_layernorms,
    wrap_mlp,
)
from vitq.models.registry import register_adapter
from vitq.models.timm_cait import class_attention_blocks, wrap_class_attention_blocks
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantXCAttention


@register_adapter("xcit")
class XcitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.xcit import Xcit

        return isinstance(model, Xcit)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        for index, role in _patch_embed_convs(model):
            fold_batchnorm(model, f"patch_embed.proj.{index}.0", f"patch_embed.proj.{index}.1")
            replace_module(model, f"patch_embed.proj.{index}.0", QConv2d(model.patch_embed.proj[index][0], role))
        for i, block in enumerate(model.blocks):
            replace_module(model, f"blocks.{i}.attn", QuantXCAttention(block.attn))
            for conv in ("conv1", "conv2"):
                replace_module(model, f"blocks.{i}.local_mp.{conv}", QConv2d(getattr(block.local_mp, conv), "act"))
            wrap_mlp(model, f"blocks.{i}.mlp")
        wrap_class_attention_blocks(model, "cls_attn_blocks")
        if isinstance(model.head, nn.Linear):
            replace_module(model, "head", QLinear(model.head, "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``embed``, each XCA block, ``cls_token``, each class-attention block, ``head`` (module docstring).

        Between ``embed`` and ``cls_token`` the stream is the token grid as an image [B, C, Hp, Wp]: timm passes the
        grid size next to the tokens, a stage passes one tensor. Only reshapes and transposes convert between the
        two layouts, so the stages compute timm's forward exactly."""

        def embed(x: torch.Tensor) -> torch.Tensor:
            tokens, (height, width) = model.patch_embed(x)
            batch = tokens.shape[0]
            if model.pos_embed is not None:
                position = model.pos_embed(batch, height, width).reshape(batch, -1, tokens.shape[1])
                tokens = tokens + position.permute(0, 2, 1)
            return _as_grid(model.pos_drop(tokens), height, width)

        def xca_block(block: nn.Module):
            def run(x: torch.Tensor) -> torch.Tensor:
                height, width = x.shape[2:]
                return _as_grid(block(_as_tokens(x), height, width), height, width)

            return run

        def to_tokens(x: torch.Tensor) -> torch.Tensor:
            tokens = _as_tokens(x)
            if model.cls_attn_blocks is None:  # pruned by timm's prune_intermediate_layers: no class token either
                return tokens
            return torch.cat((model.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)

        def head(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(x))

        return [
            Stage("embed", ("patch_embed", "pos_embed"), embed),
            *(Stage(f"blocks.{i}", (f"blocks.{i}",), xca_block(block)) for i, block in enumerate(model.blocks)),
            Stage("cls_token", (), to_tokens),
            *(Stage(f"cls_attn_blocks.{j}", (f"cls_attn_blocks.{j}",), block)
              for j, block in enumerate(class_attention_blocks(model, "cls_attn_blocks"))),
            Stage("head", ("norm", "head"), head),
        ]

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """Per XCA block ``norm1`` → ``attn.qkv`` and ``norm2`` → ``mlp.fc1`` (pre-norm: each norm's output is read
        by that Linear only).

        Left out, because a fold would change the function:

        - ``norm3`` → ``local_mp.conv1``: the conv zero-pads its input, and the fold's shift ``b`` (``X' = X/r − b``)
          would then be compensated in the interior but not at the border pixels, where the padding adds no ``b``;
        - the class-attention blocks' ``norm1`` → ``attn.qkv``: timm's XCiT block adds ``norm1``'s output of the patch
          tokens to their residual (``x + γ₁·cat(attn(x̂), x̂[:, 1:])``, ``x̂ = norm1(x)``), so the folded norm would
          change the patch tokens, which no Linear compensates;
        - the class-attention blocks' ``norm2`` → ``mlp.fc1``: ``norm2``'s output replaces the class token in the
          residual stream (``x = cat(norm2(x_cls), x_patches)``, then ``x + γ₂·mlp(x_cls)``);
        - ``norm`` → ``head``, as in ViT: the classifier input has role ``act``."""
        return [pair for i in range(len(model.blocks)) for pair in block_norm_pairs(model, f"blocks.{i}")]


def _patch_embed_convs(model: nn.Module) -> list[tuple[int, str]]:
    """``(index, input role)`` of each ``conv3x3`` (a ``Sequential(Conv2d, BatchNorm2d)``) of ``patch_embed.proj``:
    the first reads the image, the others a GELU output."""
    indices = [i for i, layer in enumerate(model.patch_embed.proj)
               if isinstance(layer, nn.Sequential) and isinstance(layer[0], nn.Conv2d)]
    return [(index, "image" if n == 0 else "act") for n, index in enumerate(indices)]


def _as_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens [B, H·W, C] (row-major over the grid) as an image [B, C, H, W]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def _as_tokens(grid: torch.Tensor) -> torch.Tensor:
    """An image [B, C, H, W] as contiguous tokens [B, H·W, C] (timm's layout between blocks)."""
    return grid.flatten(2).transpose(1, 2).contiguous()
