"""SigLIP's image tower, alone or inside a whole SigLIP model.

The tower is a ViT without a class token (patch embedding with a bias, tanh-approximated GELU) whose
post-LayerNorm'd tokens go through a multi-head attention pooling head: a learned probe attends over them, then a
residual LayerNorm + MLP. That is timm's ``VisionTransformer`` with ``class_token=False, global_pool='map'``
(``AttentionPoolLatent``). The output is transformers' ``pooler_output`` (a whole SigLIP model's image features: it
has no projection). ``nn.MultiheadAttention`` keeps q, k and v in one ``in_proj``; timm's pool splits q from kv.
The pooling head's Linears stay float (the timm adapter quantizes the blocks and the head Linear only).

A whole model's ``config.json`` usually writes only what differs from the vision config's defaults, so those are
filled in first.
"""

from __future__ import annotations

from vitq.errors import VitqError
from vitq.models.hf.clip import _ClipVisionLayout
from vitq.models.hf.layout import Layout, register_layout

#: transformers' ``SiglipVisionConfig`` defaults
_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
             "layer_norm_eps": 1e-6, "vision_use_head": True}


@register_layout
class _SiglipVisionLayout(Layout):
    model_type = "siglip_vision_model"
    heads = {"SiglipVisionModel": ("vision_model.", {})}
    outer = {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "pos_embed": "embeddings.position_embedding.weight",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias",
             "attn_pool.latent": "head.probe",
             **{f"attn_pool.{timm}.{tensor}": f"head.{hf}.{tensor}" for timm, hf in (
                 ("proj", "attention.out_proj"), ("norm", "layernorm"), ("mlp.fc1", "mlp.fc1"),
                 ("mlp.fc2", "mlp.fc2")) for tensor in ("weight", "bias")}}
    packed = {"head.attention.in_proj_weight": ("attn_pool.q.weight", "attn_pool.kv.weight"),
              "head.attention.in_proj_bias": ("attn_pool.q.bias", "attn_pool.kv.bias")}
    # the encoder layers are CLIP's, module for module
    layer, block, qkv = _ClipVisionLayout.layer, _ClipVisionLayout.block, _ClipVisionLayout.qkv
    timm_kwargs = {"class_token": False, "global_pool": "map"}

    def vision_config(self, config: dict) -> dict:
        config = {**_DEFAULTS, **config}
        if not config["vision_use_head"]:
            raise VitqError(f"{self.source}: a SigLIP image tower without its attention pooling head "
                            "(vision_use_head false) has no pooled output; vitq reads it with the head")
        return config


@register_layout
class _SiglipLayout(_SiglipVisionLayout):
    """A whole SigLIP model: its image tower (the text tower is not read)."""

    model_type = "siglip"
    heads = {"SiglipModel": ("vision_model.", {})}

    def vision_config(self, config: dict) -> dict:
        vision = config.get("vision_config") or {}
        if not isinstance(vision, dict):
            raise VitqError(f"{self.source}: a SigLIP config's 'vision_config' must be an object, got {vision!r}")
        return super().vision_config(vision)
