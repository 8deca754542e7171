"""HuggingFace transformers checkpoints, loaded into the equivalent timm architecture (and written back).

``--model hf:<folder or hub name>`` names a transformers checkpoint: a folder with ``config.json``, the weights in
``model.safetensors`` and, usually, ``preprocessor_config.json`` (a hub name is downloaded to the local hub cache
first, which needs a network). vitq reads the files itself, without importing transformers, and builds the timm
model that computes the same function (ViT → ``VisionTransformer``, DeiT with its distillation token →
``VisionTransformerDistilled``, CLIP's image tower → a pre-norm ``VisionTransformer`` whose output is the pooled
feature or, with the projection as its head, the image embedding), its weights renamed (``query``/``key``/``value``
concatenated into ``qkv``). The
model then goes through the timm adapter unchanged: the same quantization point names and roles
(``blocks.3.attn.softmax``, ...), every method, export and runtime. Because vitq's own attention replaces the
fused kernel, transformers' SDPA/flash attention never bypasses the softmax quantizer.

The preprocessing is the image processor's, translated into a timm data config (``model.pretrained_cfg``):
``size`` ``{height, width}`` resizes both sides (timm's ``squash`` crop mode), ``{shortest_edge}`` keeps the aspect
ratio (``center``), then the optional centre crop, the processor's resampling filter and mean/std.

:func:`write_hf_folder` goes the other way for the plain timm ViT/DeiT layouts (``vitq convert --to hf``), so a
timm checkpoint can be measured through this path; its ``preprocessor_config.json`` is a ``CLIPImageProcessor``
(shortest edge, then centre crop), which reproduces timm's evaluation transform exactly.

A saved quantized model of an ``hf:`` model records that name; loading it rebuilds the architecture from the
folder's ``config.json`` (no weights are read from it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.weights import load_state_dict_file, quiet_hub

HF_PREFIX = "hf:"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROCESSOR_FILE = "preprocessor_config.json"

#: transformers' activation names -> the torch module that computes them (or its timm name)
_ACTIVATIONS: dict[str, Callable[[], nn.Module] | str] = {
    "gelu": nn.GELU,
    "gelu_new": partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
    "quick_gelu": "quick_gelu",  # timm's own name for it
}
#: PIL resampling codes used by the image processors -> timm interpolation names
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
#: the image processors' defaults where a folder has no preprocessor_config.json (ViTImageProcessor's; its size is
#: the model's image size)
_DEFAULT_PROCESSOR = {"do_resize": True, "resample": 2, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                      "image_std": [0.5, 0.5, 0.5]}


def is_hf_name(name: object) -> bool:
    """Whether ``name`` names a transformers checkpoint (``hf:<folder or hub name>``)."""
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def hf_folder(name: str, *, weights: bool = True) -> Path:
    """The local folder of ``hf:<source>``: the folder itself, or the hub snapshot (downloaded when missing from
    the cache; ``weights=False`` fetches the small JSON files only)."""
    source = name[len(HF_PREFIX):]
    if not source:
        raise VitqError("hf: needs a folder or a hub name, e.g. hf:./deit-tiny or hf:facebook/deit-tiny-patch16-224")
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise VitqError(f"{name}: no such folder (and not a hub name owner/model)")
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_FILE, PROCESSOR_FILE, *([WEIGHTS_FILE] if weights else [])]
    try:
        with quiet_hub():
            return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as err:  # network or hub failures come in many exception types
        raise VitqError(f"could not download {source!r} from the HuggingFace hub ({type(err).__name__}); "
                        "pass a local folder: hf:<folder with config.json and model.safetensors>") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VitqError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise VitqError(f"{path} is not a JSON object")
    return data


# ------------------------------------------------------------------------------------------- the architecture
def _field(config: dict, key: str, kind: type, source: str):
    value = config.get(key)
    if kind is int and isinstance(value, list | tuple) and len(set(value)) == 1:
        value = value[0]  # a square size written as [h, w]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise VitqError(f"{source}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value


class _Layout:
    """One transformers model type: its timm constructor and the key names of its checkpoint."""

    model_type: str
    #: architectures of this model type vitq reads -> (checkpoint key prefix, {hf head: timm head}); a model without
    #: a head gives the timm model's pooled features (num_classes 0)
    heads: dict[str, tuple[str, dict[str, str]]]
    #: timm key -> transformers key (after the prefix) outside the blocks
    outer: dict[str, str]
    #: a block's transformers prefix (``{i}``: its index), its (timm, transformers) modules, and where q, k and v
    #: sit (their weights are concatenated into timm's ``qkv``)
    layer: str
    block: tuple[tuple[str, str], ...]
    qkv: tuple[str, str, str]
    #: extra timm constructor arguments
    timm_kwargs: dict[str, Any] = {}

    def __init__(self, config: dict, source: str) -> None:
        architectures = config.get("architectures") or [next(iter(self.heads))]
        self.architecture = architectures[0]
        if self.architecture not in self.heads:
            raise VitqError(f"{source}: {self.architecture} is not supported; vitq reads "
                            f"{', '.join(self.heads)} for model type {self.model_type!r}")
        self.prefix, self.head_names = self.heads[self.architecture]
        self.source = source
        config = self.vision_config(config)
        act = config.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise VitqError(f"{source}: activation {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        hidden = _field(config, "hidden_size", int, source)
        intermediate = _field(config, "intermediate_size", int, source)
        self.num_classes = self.head_classes(config) if self.head_names else 0
        self.kwargs: dict[str, Any] = {
            "img_size": _field(config, "image_size", int, source),
            "patch_size": _field(config, "patch_size", int, source),
            "in_chans": config.get("num_channels", 3),
            "embed_dim": hidden,
            "depth": _field(config, "num_hidden_layers", int, source),
            "num_heads": _field(config, "num_attention_heads", int, source),
            "mlp_ratio": intermediate / hidden,
            "qkv_bias": bool(config.get("qkv_bias", True)),
            "norm_layer": partial(nn.LayerNorm, eps=float(config.get("layer_norm_eps", 1e-12))),
            "act_layer": _ACTIVATIONS[act],
            "num_classes": self.num_classes,
            **self.timm_kwargs,
        }

    def vision_config(self, config: dict) -> dict:
        """The config of the image model (a vision tower nests it)."""
        return config

    def head_classes(self, config: dict) -> int:
        labels = config.get("id2label") or {}
        return len(labels) or _field(config, "num_labels", int, self.source)

    def build(self) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**self.kwargs)

    def key_map(self, depth: int, prefix: str) -> dict[str, str]:
        """timm key -> transformers key (base-model tensors under ``prefix``), for every tensor but the
        concatenated ``qkv``."""
        keys = {timm_key: prefix + hf_key for timm_key, hf_key in self.outer.items()}
        for i in range(depth):
            hf = prefix + self.layer.format(i=i)
            for timm_name, hf_name in self.block:
                for tensor in ("weight", "bias"):
                    keys[f"blocks.{i}.{timm_name}.{tensor}"] = f"{hf}{hf_name}.{tensor}"
        for hf_head, timm_head in self.head_names.items():
            for tensor in ("weight", "bias"):
                keys[f"{timm_head}.{tensor}"] = f"{hf_head}.{tensor}"
        return keys

    def qkv_keys(self, block: int, tensor: str, prefix: str) -> list[str]:
        return [f"{prefix}{self.layer.format(i=block)}{part}.{tensor}" for part in self.qkv]

    def timm_state(self, hf_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state dict from the transformers tensors ``hf_state`` (a missing tensor is one error line;
        a head without a bias gets zeros)."""
        depth = self.kwargs["depth"]
        shapes = {key: value.shape for key, value in model.state_dict().items()}
        first_block = self.layer.format(i=0)
        # a base model's tensors may be saved with or without its attribute name (CLIPVisionModel's vision_model.)
        prefix = next((p for p in (self.prefix, "") if any(k.startswith(p + first_block) for k in hf_state)),
                      self.prefix)

        def take(key: str, timm_key: str) -> torch.Tensor:
            if key not in hf_state:
                if timm_key.startswith("head") and timm_key.endswith(".bias"):  # CLIP's projection has none
                    return torch.zeros(shapes[timm_key])
                raise VitqError(f"{self.source}: {WEIGHTS_FILE} has no tensor {key!r} (is it a {self.architecture}?)")
            value = hf_state[key]  # CLIP keeps its class token and position embedding without the batch axes
            return value.reshape(shapes[timm_key]) if value.numel() == shapes[timm_key].numel() else value

        state = {timm_key: take(hf_key, timm_key) for timm_key, hf_key in self.key_map(depth, prefix).items()}
        for i in range(depth):
            for tensor in ("weight", "bias") if self.kwargs["qkv_bias"] else ("weight",):
                timm_key = f"blocks.{i}.attn.qkv.{tensor}"
                state[timm_key] = torch.cat([take(key, timm_key) for key in self.qkv_keys(i, tensor, prefix)])
        return state


_PATCH = {"patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
          "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
          "pos_embed": "embeddings.position_embeddings", "cls_token": "embeddings.cls_token",
          "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_VIT_BLOCK = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
              ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))


class _VitLayout(_Layout):
    model_type = "vit"
    heads = {"ViTForImageClassification": ("vit.", {"classifier": "head"}), "ViTModel": ("", {})}
    outer = _PATCH
    layer = "encoder.layer.{i}."
    block = _VIT_BLOCK
    qkv = ("attention.attention.query", "attention.attention.key", "attention.attention.value")


class _DeitLayout(_VitLayout):
    model_type = "deit"
    heads = {"DeiTForImageClassificationWithTeacher": (
        "deit.", {"cls_classifier": "head", "distillation_classifier": "head_dist"}), "DeiTModel": ("", {})}
    outer = {**_PATCH, "dist_token": "embeddings.distillation_token"}

    def build(self) -> nn.Module:
        from timm.models.deit import VisionTransformerDistilled

        return VisionTransformerDistilled(**self.kwargs)


class _ClipVisionLayout(_Layout):
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

    def head_classes(self, config: dict) -> int:
        return _field(config, "projection_dim", int, self.source)


class _ClipLayout(_ClipVisionLayout):
    """A whole CLIP model: its image tower and projection (the text tower is not read)."""

    model_type = "clip"
    heads = {"CLIPModel": ("vision_model.", {"visual_projection": "head"})}

    def vision_config(self, config: dict) -> dict:
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise VitqError(f"{self.source}: a CLIP config needs its 'vision_config'")
        return {**vision, "projection_dim": config.get("projection_dim", vision.get("projection_dim"))}


_LAYOUTS = {layout.model_type: layout for layout in (_VitLayout, _DeitLayout, _ClipVisionLayout, _ClipLayout)}


def _layout(config: dict, source: str) -> _Layout:
    model_type = config.get("model_type")
    if model_type not in _LAYOUTS:
        raise VitqError(f"{source}: transformers model type {model_type!r} is not supported; vitq reads "
                        f"{', '.join(sorted(_LAYOUTS))}")
    return _LAYOUTS[model_type](config, source)


# ------------------------------------------------------------------------------------------- the preprocessing
def data_config(processor: dict, source: str, image_size: int) -> dict[str, Any]:
    """The timm data config (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``) that
    reproduces an image processor's evaluation preprocessing (see the module notes); without a processor file,
    ViTImageProcessor's defaults at the model's ``image_size``."""
    processor = {**_DEFAULT_PROCESSOR, "size": {"height": image_size, "width": image_size}, **processor}
    factor = processor.get("rescale_factor", 1 / 255)
    if not processor.get("do_rescale", True) or not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        raise VitqError(f"{source}: only images rescaled by 1/255 are supported (rescale_factor {factor})")
    if not processor.get("do_resize", True):
        raise VitqError(f"{source}: an image processor without resizing is not supported")
    size = processor.get("size")
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = processor.get("crop_size") if processor.get("do_center_crop", False) else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if isinstance(size, dict) and "shortest_edge" in size:
        resize, mode = size["shortest_edge"], "center"
        if "crop_pct" in processor and crop is None:  # ConvNeXt's processor: resize to edge/crop_pct, crop edge
            crop, resize = {"height": resize, "width": resize}, math.floor(resize / processor["crop_pct"])
    elif isinstance(size, dict) and size.get("height") == size.get("width") and size.get("height"):
        resize, mode = size["height"], "squash"
    else:
        raise VitqError(f"{source}: image size {size!r} is not supported (a square {{height, width}} or "
                        "{shortest_edge})")
    if crop is not None and crop.get("height") != crop.get("width"):
        raise VitqError(f"{source}: crop size {crop!r} is not square")
    side = resize if crop is None else crop["height"]
    resample = processor.get("resample", 2)
    if resample not in _RESAMPLE:
        raise VitqError(f"{source}: resampling filter {resample!r} is not supported "
                        f"({', '.join(f'{k} ({v})' for k, v in _RESAMPLE.items())})")
    normalize = processor.get("do_normalize", True)
    crop_pct = side / resize
    while math.floor(side / crop_pct) < resize:  # timm resizes to floor(side / crop_pct): undo the division's rounding
        crop_pct = math.nextafter(crop_pct, 0.0)
    return {"input_size": (3, side, side), "interpolation": _RESAMPLE[resample], "crop_pct": crop_pct,
            "crop_mode": mode, "mean": tuple(processor["image_mean"]) if normalize else (0.0, 0.0, 0.0),
            "std": tuple(processor["image_std"]) if normalize else (1.0, 1.0, 1.0)}


# ------------------------------------------------------------------------------------------- loading
def create_hf_architecture(name: str) -> nn.Module:
    """The randomly initialised timm model of ``hf:<source>`` (its config files only), its preprocessing in
    ``pretrained_cfg``, in eval mode."""
    folder = hf_folder(name, weights=False)
    return _architecture(name, folder)[0]


def _architecture(name: str, folder: Path) -> tuple[nn.Module, _Layout]:
    if not (folder / CONFIG_FILE).is_file():
        raise VitqError(f"{name}: no {CONFIG_FILE} in {folder}")
    layout = _layout(_read_json(folder / CONFIG_FILE), name)
    model = layout.build()
    processor_path = folder / PROCESSOR_FILE
    processor = _read_json(processor_path) if processor_path.is_file() else {}
    model.pretrained_cfg = {**data_config(processor, name, layout.kwargs["img_size"]),
                            "num_classes": layout.num_classes, "architecture": layout.architecture, "source": name}
    return model.eval(), layout


def load_hf_model(name: str) -> nn.Module:
    """The float timm model of the transformers checkpoint ``hf:<source>``, its weights read strictly from
    ``model.safetensors`` (every tensor finite), in eval mode on the CPU."""
    folder = hf_folder(name)
    model, layout = _architecture(name, folder)
    load_state_dict_file(model, folder / WEIGHTS_FILE, f"{name} ({layout.architecture})",
                         convert=lambda hf_state: layout.timm_state(hf_state, model))
    return model


# ------------------------------------------------------------------------------------------- writing
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
    layout = _layout(config, "conversion")
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
    resample = {name: code for code, name in _RESAMPLE.items()}.get(data["interpolation"])
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


__all__ = ["HF_PREFIX", "create_hf_architecture", "data_config", "hf_folder", "is_hf_name", "load_hf_model",
           "write_hf_folder"]
