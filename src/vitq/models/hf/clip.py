"""CLIP's image tower, alone or inside a whole CLIP model.

A config written by transformers leaves out what equals the vision config's defaults (a whole model's
``vision_config`` often does), so those are filled in first.
"""

from __future__ import annotations

from vitq.errors import VitqError
from vitq.models.hf.layout import Layout, config_field, register_layout

#: transformers' ``CLIPVisionConfig`` defaults
_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


@register_layout
class _ClipVisionLayout(Layout):
    """CLIP's image tower: pre-LayerNorm, quick GELU, no patch bias; its output is the pooled (post-LayerNorm)
    class token, or with the projection the image embedding."""

    model_type = "clip_vision_model"
    heads = {"CLIPVisionModelWithProjection": ("vision_model.", {"visual_projection": "head"}),
             "CLIPVisionModel": ("vision_model.", {})}
    outer = {"patch_embed.proj.weight": "embeddings.patch_embedding.weight", "cls_token": "embeddings.class_embedding",
             "pos_embed": "embeddings.position_embedding.weight", "norm_pre.weight": "pre_layrnorm.weight",
             "norm_pre.bias": "pre_layrnorm.bias", "norm.weight": "post_layernorm.weight",
             "norm.bias": "post_layernorm.bias"}
    layer = "encoder.layers.{i}."
    block = (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    timm_kwargs = {"pre_norm": True}

    def vision_config(self, config: dict) -> dict:
        return {**_DEFAULTS, **config}

    def head_classes(self, config: dict) -> int:
        return config_field(config, "projection_dim", int, self.source)


@register_layout
class _ClipLayout(_ClipVisionLayout):
    """A whole CLIP model: its image tower and projection (the text tower is not read)."""

    model_type = "clip"
    heads = {"CLIPModel": ("vision_model.", {"visual_projection": "head"})}

    def vision_config(self, config: dict) -> dict:
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise VitqError(f"{self.source}: a CLIP config needs its 'vision_config'")
        projection = config.get("projection_dim", vision.get("projection_dim", _DEFAULTS["projection_dim"]))
        return super().vision_config({**vision, "projection_dim": projection})
