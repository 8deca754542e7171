"""HuggingFace transformers checkpoints, loaded into the equivalent timm architecture (and written back).

``--model hf:<folder or hub name>`` names a transformers checkpoint: a folder with ``config.json``, the weights in
``model.safetensors`` and, usually, ``preprocessor_config.json`` (a hub name is downloaded to the local hub cache
first, which needs a network). vitq reads the files itself, without importing transformers, and builds the timm
model that computes the same function, one layout module per model family:

- ``vit``: ViT → ``VisionTransformer``; DeiT with its distillation token → ``VisionTransformerDistilled``;
- ``clip``: CLIP's image tower → a pre-norm ``VisionTransformer`` whose output is the pooled feature or, with the
  projection as its head, the image embedding;
- ``dinov2``: DINOv2 (with or without registers) → a ``VisionTransformer`` with LayerScale, built at the
  processor's image size with its position embedding resampled as transformers resamples it; its classifier reads
  the class token and the mean patch token;
- ``siglip``: SigLIP's image tower → a ``VisionTransformer`` without class token whose attention pooling head is
  timm's ``map`` pool;
- ``swin``: Swin → ``SwinTransformer``, its patch merging moved to the start of the next stage as timm files it.

The weights are renamed (``query``/``key``/``value`` concatenated into ``qkv``). The model then goes through the
timm adapter unchanged: the same quantization point names and roles (``blocks.3.attn.softmax``, ...), every
method, export and runtime. Because vitq's own attention replaces the fused kernel, transformers' SDPA/flash
attention never bypasses the softmax quantizer.

The preprocessing is the image processor's, translated into a timm data config (``model.pretrained_cfg``):
``size`` ``{height, width}`` resizes both sides (timm's ``squash`` crop mode), ``{shortest_edge}`` keeps the aspect
ratio (``center``; a plain number is either, as the processor class reads it), then the optional centre crop,
the processor's resampling filter and mean/std.

:func:`write_hf_folder` goes the other way for the plain timm ViT/DeiT layouts (``vitq convert --to hf``), so a
timm checkpoint can be measured through this path; its ``preprocessor_config.json`` is a ``CLIPImageProcessor``
(shortest edge, then centre crop), which reproduces timm's evaluation transform exactly.

A saved quantized model of an ``hf:`` model records that name; loading it rebuilds the architecture from the
folder's ``config.json`` (no weights are read from it).
"""

from __future__ import annotations

from vitq.models.hf import clip, dinov2, siglip, swin, vit  # noqa: F401  (register their layouts)
from vitq.models.hf.convert import write_hf_folder
from vitq.models.hf.files import HF_PREFIX, hf_folder, is_hf_name
from vitq.models.hf.load import create_hf_architecture, load_hf_model
from vitq.models.hf.processor import data_config

__all__ = ["HF_PREFIX", "create_hf_architecture", "data_config", "hf_folder", "is_hf_name", "load_hf_model",
           "write_hf_folder"]
