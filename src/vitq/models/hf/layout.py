"""The base of the transformers layouts: how one model type's config and checkpoint map onto a timm model; the
registry of layouts by ``model_type``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.hf.files import WEIGHTS_FILE

#: transformers' activation names -> the torch module that computes them (or its timm name)
_ACTIVATIONS: dict[str, Callable[[], nn.Module] | str] = {
    "gelu": nn.GELU,
    "gelu_new": partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
    "quick_gelu": "quick_gelu",  # timm's own name for it
}

def config_field(config: dict, key: str, kind: type, source: str):
    value = config.get(key)
    if kind is int and isinstance(value, list | tuple) and len(set(value)) == 1:
        value = value[0]  # a square size written as [h, w]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise VitqError(f"{source}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value


class Layout:
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
        hidden = config_field(config, "hidden_size", int, source)
        intermediate = config_field(config, "intermediate_size", int, source)
        self.num_classes = self.head_classes(config) if self.head_names else 0
        self.kwargs: dict[str, Any] = {
            "img_size": config_field(config, "image_size", int, source),
            "patch_size": config_field(config, "patch_size", int, source),
            "in_chans": config.get("num_channels", 3),
            "embed_dim": hidden,
            "depth": config_field(config, "num_hidden_layers", int, source),
            "num_heads": config_field(config, "num_attention_heads", int, source),
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
        return len(labels) or config_field(config, "num_labels", int, self.source)

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


_LAYOUTS: dict[str, type[Layout]] = {}


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: read checkpoints of ``cls.model_type`` with ``cls``."""
    _LAYOUTS[cls.model_type] = cls
    return cls




def layout_for(config: dict, source: str) -> Layout:
    model_type = config.get("model_type")
    if model_type not in _LAYOUTS:
        raise VitqError(f"{source}: transformers model type {model_type!r} is not supported; vitq reads "
                        f"{', '.join(sorted(_LAYOUTS))}")
    return _LAYOUTS[model_type](config, source)
