"""Writing a float timm ViT/DeiT as a transformers folder."""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from vitq.errors import VitqError
from vitq.models.hf.files import CONFIG_FILE, PROCESSOR_FILE, WEIGHTS_FILE
from vitq.models.hf.layout import layout_for
from vitq.models.hf.processor import RESAMPLE


def write_hf_folder(model: nn.Module, output: str | Path) -> Path:
    """Write the float timm ViT/DeiT ``model`` as a transformers folder (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``) that ``hf:<output>`` and transformers' ``from_pretrained`` read back."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    from vitq.data.transforms import data_config_for_model
    from vitq.files import write_json, write_safetensors

    if not isinstance(model, VisionTransformer):
        raise VitqError(f"only timm ViT/DeiT models convert to transformers, not {type(model).__name__}")
    distilled = isinstance(model, VisionTransformerDistilled)
    block = model.blocks[0]
    plain = (model.global_pool == "token" and model.has_class_token and not model.no_embed_class
             and model.num_reg_tokens == 0 and isinstance(model.fc_norm, nn.Identity)
             and isinstance(model.norm_pre, nn.Identity) and isinstance(model.norm, nn.LayerNorm)
             and isinstance(block.ls1, nn.Identity) and isinstance(block.attn.q_norm, nn.Identity)
             and isinstance(block.mlp.act, nn.GELU) and isinstance(model.head, nn.Linear | nn.Identity))
    if not plain:
        raise VitqError("only the plain ViT/DeiT layout converts to transformers (class token, LayerNorm, GELU, "
                        "no LayerScale, registers, qk-norm or pre-norm)")
    embed, heads = model.embed_dim, model.blocks[0].attn.num_heads
    labels = _labels(model.num_classes)
    config = {
        "architectures": ["DeiTForImageClassificationWithTeacher" if distilled else "ViTForImageClassification"],
        "model_type": "deit" if distilled else "vit",
        "hidden_size": embed, "num_hidden_layers": len(model.blocks), "num_attention_heads": heads,
        "intermediate_size": block.mlp.fc1.out_features, "hidden_act": "gelu" if block.mlp.act.approximate == "none"
        else "gelu_pytorch_tanh", "layer_norm_eps": model.norm.eps, "image_size": model.patch_embed.img_size[0],
        "patch_size": model.patch_embed.patch_size[0], "num_channels": model.patch_embed.proj.in_channels,
        "qkv_bias": block.attn.qkv.bias is not None, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)},
    }
    layout = layout_for(config, "conversion")
    timm_state = model.state_dict()
    keys = layout.key_map(len(model.blocks), layout.prefix)
    state = {hf_key: timm_state[timm_key] for timm_key, hf_key in keys.items()}
    for i in range(len(model.blocks)):
        for tensor in ("weight", "bias") if config["qkv_bias"] else ("weight",):
            chunks = timm_state[f"blocks.{i}.attn.qkv.{tensor}"].chunk(3)
            state.update(zip(layout.qkv_keys(i, tensor, layout.prefix), chunks, strict=True))
    data = data_config_for_model(model)
    if data.get("crop_mode", "center") != "center":
        raise VitqError(f"the model's crop mode {data['crop_mode']!r} has no transformers image processor here")
    side = data["input_size"][-1]
    if side != model.patch_embed.img_size[0]:
        raise VitqError(f"the model's data config gives {side}px images but it takes {model.patch_embed.img_size[0]}px")
    resample = {name: code for code, name in RESAMPLE.items()}.get(data["interpolation"])
    if resample is None:
        raise VitqError(f"interpolation {data['interpolation']!r} has no transformers image processor here")
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                 "size": {"shortest_edge": math.floor(side / data["crop_pct"])}, "resample": resample,
                 "do_center_crop": True, "crop_size": {"height": side, "width": side}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(data["mean"]),
                 "image_std": list(data["std"]), "do_convert_rgb": True}
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / CONFIG_FILE, config)
    write_json(output / PROCESSOR_FILE, processor)
    write_safetensors(output / WEIGHTS_FILE, {k: v.detach().cpu().contiguous() for k, v in state.items()},
                      {"format": "pt"})
    return output


def _labels(classes: int) -> list[str]:
    """ImageNet-1k class names for a 1000-class head (timm's table, the index appended: a few names repeat), else
    ``LABEL_i``."""
    if classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [f"{info.index_to_description(i)} ({i})" for i in range(classes)]
    return [f"LABEL_{i}" for i in range(classes)]
