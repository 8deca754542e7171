"""DINOv2 checkpoints, with or without registers: the base model (its output is the final-LayerNorm'd class token,
transformers' ``pooler_output``) and the linear classifier on the class token concatenated with the mean of the
patch tokens.

DINOv2 keeps ViT's embedding and attention tensor names and adds LayerScale (timm's ``init_values``,
``ls1.gamma``). Its optional SwiGLU MLP packs the gate and value projections into one ``weights_in`` Linear, gate
first, and its width is two thirds of ``mlp_ratio``'s rounded up to a multiple of 8: timm's ``SwiGLUPacked``.

transformers resamples the position embedding to every input's patch grid (bicubic; the register models
antialias, the others do not), so a checkpoint trained at 518 px runs at the processor's 224 px crop. The timm model
is built at the processor's size and the embedding resampled once, when the weights are read, in the same way.
With registers the class token's position embedding is added to the token itself, since timm's ``no_embed_class``
gives neither the class token nor the registers one.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import SwiGLUPacked, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitq.errors import VitqError
from vitq.models.hf.layout import config_field, register_layout
from vitq.models.hf.vit import _VitLayout

_BLOCK = (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.output.dense"))
_MLP = (("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
_SWIGLU = (("mlp.fc1", "mlp.weights_in"), ("mlp.fc2", "mlp.weights_out"))


class ClassAndPatchMeanViT(VisionTransformer):
    """timm's ``VisionTransformer`` whose head reads the class token concatenated with the mean of the patch tokens
    (registers left out), as DINOv2's classifier does; timm has no such pooling."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head_hidden_size = 2 * self.embed_dim
        self.head = nn.Linear(self.head_hidden_size, self.num_classes)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        return torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=1)


@register_layout
class _Dinov2Layout(_VitLayout):
    model_type = "dinov2"
    heads = {"Dinov2ForImageClassification": ("dinov2.", {"classifier": "head"}), "Dinov2Model": ("", {})}
    #: whether transformers antialiases when it resamples the position embedding
    antialias = False

    def __init__(self, config: dict, source: str) -> None:
        self.swiglu = bool(config.get("use_swiglu_ffn", False))
        self.block = _BLOCK + (_SWIGLU if self.swiglu else _MLP)
        super().__init__(config, source)
        self.grid = self.kwargs["img_size"] // self.kwargs["patch_size"]  # the checkpoint's position embedding grid

    def model_kwargs(self, config: dict) -> dict[str, Any]:
        """ViT's arguments with LayerScale and the MLP width transformers derives from ``mlp_ratio``."""
        ratio = config.get("mlp_ratio", 4)
        if not isinstance(ratio, int | float) or isinstance(ratio, bool) or ratio <= 0:
            raise VitqError(f"{self.source}: 'mlp_ratio' must be a positive number, got {ratio!r}")
        width = int(config_field(config, "hidden_size", int, self.source) * ratio)
        if self.swiglu:
            width = 2 * ((int(width * 2 / 3) + 7) // 8 * 8)  # the gate and the value, packed in one Linear
        kwargs = super().model_kwargs({**config, "intermediate_size": width})
        kwargs["init_values"] = 1.0  # any non-zero value gives timm's LayerScale; the checkpoint sets it
        if self.swiglu:  # transformers' SwiGLU is SiLU-gated whatever hidden_act says
            kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        return kwargs

    def set_input_size(self, side: int) -> None:
        self.kwargs["img_size"] = side

    def build(self) -> nn.Module:
        return (ClassAndPatchMeanViT if self.head_names else VisionTransformer)(**self.kwargs)

    def key_map(self, depth: int, prefix: str) -> dict[str, str]:
        """ViT's map plus each block's two LayerScales."""
        keys = super().key_map(depth, prefix)
        for i in range(depth):
            timm_block, hf_block = self.block_prefixes(i)
            for scale in (1, 2):
                keys[f"{timm_block}ls{scale}.gamma"] = f"{prefix}{hf_block}layer_scale{scale}.lambda1"
        return keys

    def timm_state(self, hf_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """The state with the position embedding (class token first) resampled to the model's patch grid."""
        state = super().timm_state(hf_state, model)
        positions = state["pos_embed"]
        if positions.shape[1] != 1 + self.grid**2:
            raise VitqError(f"{self.source}: the position embedding has {positions.shape[1]} entries, the config's "
                            f"{self.grid}x{self.grid} patch grid and class token need {1 + self.grid**2}")
        side = self.kwargs["img_size"] // self.kwargs["patch_size"]
        state["pos_embed"] = resample_abs_pos_embed(positions, new_size=[side, side], old_size=[self.grid] * 2,
                                                    num_prefix_tokens=1, antialias=self.antialias)
        return state


@register_layout
class _Dinov2WithRegistersLayout(_Dinov2Layout):
    model_type = "dinov2_with_registers"
    heads = {"Dinov2WithRegistersForImageClassification": ("dinov2_with_registers.", {"classifier": "head"}),
             "Dinov2WithRegistersModel": ("", {})}
    outer = {**_Dinov2Layout.outer, "reg_token": "embeddings.register_tokens"}
    antialias = True

    def model_kwargs(self, config: dict) -> dict[str, Any]:
        return {**super().model_kwargs(config), "no_embed_class": True,
                "reg_tokens": config_field(config, "num_register_tokens", int, self.source)}

    def timm_state(self, hf_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """The state with the class token's position embedding added to the token (the sum transformers makes)."""
        state = super().timm_state(hf_state, model)
        positions = state["pos_embed"]
        state["cls_token"] = state["cls_token"] + positions[:, :1]
        state["pos_embed"] = positions[:, 1:]
        return state
