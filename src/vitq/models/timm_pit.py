"""Adapter for timm ``PoolingVisionTransformer`` models (PiT, distilled PiT): a conv patch embedding with a learned
position grid, then transformer stages of ViT blocks separated by pooling layers that halve the token grid (a
depthwise strided conv on the patch grid) and widen the class token(s) (a Linear).

Quantization points: ``patch_embed.conv`` (its input is the image); per pooling layer
``transformers.{i}.pool.conv`` and ``transformers.{i}.pool.fc`` (stages 1..n); per block
``transformers.{i}.blocks.{j}.attn.qkv``, ``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj``,
``.mlp.fc1``, ``.mlp.fc2`` (timm's ViT ``Block``, :class:`~vitq.nn.QuantAttention`); then ``head`` (and
``head_dist``, the distillation head of the distilled models).

Roles: ``qkv`` and ``fc1`` read a LayerNorm output (``post_ln``), ``fc2`` a GELU output (``post_gelu``), ``proj``,
``head`` and ``head_dist`` ``act``. The pooling layer reads the residual stream (role ``act``): ``pool.conv`` the
patch tokens as an image [B, C, H, W] (a grouped conv: ``groups`` = input channels, two output channels per input
channel), ``pool.fc`` the class token(s).

Stays float: the learned position grid ``pos_embed`` and the class token(s), constants of the model. Every tensor keeps
timm's name.

Stages: timm passes ``(patch grid, class tokens)`` between its transformer stages; a stage here passes one tensor, the
tokens ``cat(class tokens, patch tokens)`` [B, T + H·W, C] as timm's blocks see them. ``embed`` (patch embedding +
positions, class tokens prepended), then per transformer stage its pooling layer (``transformers.{i}.pool``, with the
stage's ``norm``, an ``Identity`` in timm's PiT) and each of its blocks, then ``head`` (final norm of the class
tokens, classifier). A pooling stage turns the patch tokens back into their grid, whose size is fixed by the model's
image size (PiT adds a fixed-size position grid, so timm's PiT takes no other size).
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.models.base import ModelAdapter, Stage, block_norm_pairs, replace_module, wrap_layernorms, wrap_mlp
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear, QuantAttention


@register_adapter("pit")
class PitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.pit import PoolingVisionTransformer

        return isinstance(model, PoolingVisionTransformer)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        replace_module(model, "patch_embed.conv", QConv2d(model.patch_embed.conv, "image"))
        for i, transformer in enumerate(model.transformers):
            if transformer.pool is not None:
                replace_module(model, f"transformers.{i}.pool.conv", QConv2d(transformer.pool.conv, "act"))
                replace_module(model, f"transformers.{i}.pool.fc", QLinear(transformer.pool.fc, "act"))
            for j, block in enumerate(transformer.blocks):
                replace_module(model, f"transformers.{i}.blocks.{j}.attn", QuantAttention(block.attn))
                wrap_mlp(model, f"transformers.{i}.blocks.{j}.mlp")
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                replace_module(model, head, QLinear(getattr(model, head), "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``embed``, per transformer stage its pooling layer (when it has one, or a norm) and its blocks, ``head``
        (module docstring)."""
        count = model.cls_token.shape[1]  # class tokens (2 in the distilled models)

        def embed(x: torch.Tensor) -> torch.Tensor:
            grid = model.pos_drop(model.patch_embed(x) + model.pos_embed)
            return _tokens(model.cls_token.expand(grid.shape[0], -1, -1), grid)

        def entry(transformer: nn.Module, grid_size: tuple[int, int]):
            def run(x: torch.Tensor) -> torch.Tensor:
                cls_tokens, grid = x[:, :count], x[:, count:]
                if transformer.pool is not None:
                    grid = grid.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid_size)
                    grid, cls_tokens = transformer.pool(grid, cls_tokens)
                    return transformer.norm(_tokens(cls_tokens, grid))
                return transformer.norm(x)

            return run

        def head(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(x[:, :count]))

        stages = [Stage("embed", ("patch_embed",), embed)]
        grids = _token_grids(model)
        for i, transformer in enumerate(model.transformers):
            if transformer.pool is not None or not isinstance(transformer.norm, nn.Identity):
                name = f"transformers.{i}.pool" if transformer.pool is not None else f"transformers.{i}.norm"
                stages.append(Stage(name, (f"transformers.{i}.pool", f"transformers.{i}.norm"),
                                    entry(transformer, grids[i])))
            stages.extend(Stage(f"transformers.{i}.blocks.{j}", (f"transformers.{i}.blocks.{j}",), block)
                          for j, block in enumerate(transformer.blocks))
        stages.append(Stage("head", ("norm", "head", "head_dist"), head))
        return stages

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """Per block ``norm1`` → ``attn.qkv`` and ``norm2`` → ``mlp.fc1`` (timm's pre-norm ViT blocks). ``norm`` →
        ``head`` is left out as in ViT: the classifier input has role ``act``."""
        return [pair for i, transformer in enumerate(model.transformers) for j in range(len(transformer.blocks))
                for pair in block_norm_pairs(model, f"transformers.{i}.blocks.{j}")]


def _tokens(cls_tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``cat(class tokens, patch tokens)`` [B, T + H·W, C] from the class tokens [B, T, C] and the grid [B, C, H, W]."""
    return torch.cat((cls_tokens, grid.flatten(2).transpose(1, 2)), dim=1)


def _token_grids(model: nn.Module) -> list[tuple[int, int]]:
    """The patch grid ``(H, W)`` that enters each transformer stage (before its pooling layer): the patch embedding's,
    then each pooling conv's output."""
    height, width = model.patch_embed.grid_size
    grids = []
    for transformer in model.transformers:
        grids.append((height, width))
        if transformer.pool is not None:
            conv = transformer.pool.conv
            height, width = (_conv_output_size(size, conv.weight.shape[2 + axis], conv.stride[axis],
                                               conv.padding[axis], conv.dilation[axis])
                             for axis, size in enumerate((height, width)))
    return grids


def _conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
