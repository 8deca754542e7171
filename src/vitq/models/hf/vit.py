"""ViT and DeiT (with its distillation token) checkpoints."""

from __future__ import annotations

from torch import nn

from vitq.models.hf.layout import Layout, register_layout

_PATCH = {"patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
          "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
          "pos_embed": "embeddings.position_embeddings", "cls_token": "embeddings.cls_token",
          "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_VIT_BLOCK = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
              ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))


@register_layout
class _VitLayout(Layout):
    model_type = "vit"
    heads = {"ViTForImageClassification": ("vit.", {"classifier": "head"}), "ViTModel": ("", {})}
    outer = _PATCH
    layer = "encoder.layer.{i}."
    block = _VIT_BLOCK
    qkv = ("attention.attention.query", "attention.attention.key", "attention.attention.value")


@register_layout
class _DeitLayout(_VitLayout):
    model_type = "deit"
    heads = {"DeiTForImageClassificationWithTeacher": (
        "deit.", {"cls_classifier": "head", "distillation_classifier": "head_dist"}), "DeiTModel": ("", {})}
    outer = {**_PATCH, "dist_token": "embeddings.distillation_token"}

    def build(self) -> nn.Module:
        from timm.models.deit import VisionTransformerDistilled

        return VisionTransformerDistilled(**self.kwargs)
