"""Swin (v1) checkpoints, read into timm's ``SwinTransformer``.

Both models are the same network with the patch merging filed differently: transformers merges at the end of
a stage (``encoder.layers.{s}.downsample``, every stage but the last), timm at the start of the next one
(``layers.{s + 1}.downsample``). Both concatenate the 2×2 neighbours in the same order, (row, column) = (0, 0),
(1, 0), (0, 1), (1, 1), so the merging weights load unchanged. The shifted-window masks and relative position
indices are buffers timm computes itself; only the relative position bias tables are read.

Refused: absolute position embeddings (timm's Swin has none) and a stage whose token grid is not whole windows:
transformers pads such a grid before the cyclic shift and timm after it, so their shifted windows group different
tokens, and a grid smaller than one window shrinks the window in timm but breaks transformers' model.
"""

from __future__ import annotations

import bisect
import itertools
import math
from functools import partial
from typing import Any

from torch import nn

from vitq.errors import VitqError
from vitq.models.hf.layout import Layout, activation, config_field, register_layout
from vitq.models.hf.vit import _VIT_BLOCK

#: the eps of transformers' patch embedding and patch merging LayerNorms, which ignore ``layer_norm_eps``
_FIXED_EPS = 1e-5


@register_layout
class _SwinLayout(Layout):
    model_type = "swin"
    heads = {"SwinForImageClassification": ("swin.", {"classifier": "head.fc"}), "SwinModel": ("", {})}
    outer = {"patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
             "patch_embed.norm.weight": "embeddings.norm.weight", "patch_embed.norm.bias": "embeddings.norm.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    layer = "encoder.layers.{stage}.blocks.{j}."
    block = _VIT_BLOCK
    qkv = ("attention.self.query", "attention.self.key", "attention.self.value")

    def __init__(self, config: dict, source: str) -> None:
        super().__init__(config, source)
        self.act_layer = activation(config, source)  # timm's Swin takes no activation argument: set in build

    def model_kwargs(self, config: dict) -> dict[str, Any]:
        source = self.source
        if config.get("use_absolute_embeddings"):
            raise VitqError(f"{source}: absolute position embeddings (use_absolute_embeddings) are not supported "
                            "(timm's Swin has none)")
        image = config_field(config, "image_size", int, source)
        patch = config_field(config, "patch_size", int, source)
        window = config_field(config, "window_size", int, source)
        depths, heads = _stage_ints(config, "depths", source), _stage_ints(config, "num_heads", source)
        if len(depths) != len(heads):
            raise VitqError(f"{source}: {len(depths)} stage depths but {len(heads)} stage head counts")
        if image % patch:
            raise VitqError(f"{source}: image size {image} is not a multiple of the patch size {patch}")
        for stage in range(len(depths)):
            side = math.ceil(image // patch / 2**stage)
            if side % window:
                raise VitqError(f"{source}: stage {stage}'s {side}x{side} tokens are not whole {window}x{window} "
                                "windows (transformers and timm pad or shrink them differently)")
        return {
            "img_size": image,
            "patch_size": patch,
            "in_chans": config.get("num_channels", 3),
            "embed_dim": config_field(config, "embed_dim", int, source),
            "depths": depths,
            "num_heads": heads,
            "window_size": window,
            "mlp_ratio": float(config.get("mlp_ratio", 4.0)),
            "qkv_bias": bool(config.get("qkv_bias", True)),
            "norm_layer": partial(nn.LayerNorm, eps=float(config.get("layer_norm_eps", 1e-5))),
            "drop_path_rate": 0.0,
        }

    def build(self) -> nn.Module:
        from timm.layers import get_act_layer
        from timm.models.swin_transformer import SwinTransformer

        model = SwinTransformer(**self.kwargs)
        model.patch_embed.norm.eps = _FIXED_EPS
        act = get_act_layer(self.act_layer)
        for layer in model.layers:
            if not isinstance(layer.downsample, nn.Identity):
                layer.downsample.norm.eps = _FIXED_EPS
            for block in layer.blocks:
                block.mlp.act = act()
        return model

    def num_blocks(self) -> int:
        return sum(self.kwargs["depths"])

    def block_prefixes(self, i: int) -> tuple[str, str]:
        depths = self.kwargs["depths"]
        stage = bisect.bisect_right(list(itertools.accumulate(depths)), i)
        j = i - sum(depths[:stage])
        return f"layers.{stage}.blocks.{j}.", self.layer.format(stage=stage, j=j)

    def key_map(self, depth: int, prefix: str) -> dict[str, str]:
        """The ViT-shaped map plus each block's relative position bias table and each stage's patch merging
        (transformers' stage ``s`` → timm's ``s + 1``)."""
        keys = super().key_map(depth, prefix)
        for i in range(depth):
            timm_block, hf_block = self.block_prefixes(i)
            keys[f"{timm_block}attn.relative_position_bias_table"] = \
                f"{prefix}{hf_block}attention.self.relative_position_bias_table"
        for stage in range(1, len(self.kwargs["depths"])):
            for tensor in ("norm.weight", "norm.bias", "reduction.weight"):
                keys[f"layers.{stage}.downsample.{tensor}"] = f"{prefix}encoder.layers.{stage - 1}.downsample.{tensor}"
        return keys


def _stage_ints(config: dict, key: str, source: str) -> tuple[int, ...]:
    """A per-stage list of positive ints (``depths``, ``num_heads``)."""
    value = config.get(key)
    if not isinstance(value, list | tuple) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise VitqError(f"{source}: '{key}' must be a list of positive ints (one per stage), got {value!r}")
    return tuple(value)
