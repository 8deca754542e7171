"""The base of the transformers layouts: how one model type's config and checkpoint map onto a timm model; the
registry of layouts by ``model_type``."""

from __future__ import annotations

import math
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


def mlp_ratio(width: int, dim: int) -> float:
    """The ``mlp_ratio`` for which timm's ``int(dim * mlp_ratio)`` is ``width`` (``width / dim`` may round below
    it, e.g. 120 / 88)."""
    ratio = width / dim
    while int(dim * ratio) < width:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def activation(config: dict, source: str) -> Callable[[], nn.Module] | str:
    """The activation layer (or its timm name) of the config's ``hidden_act``."""
    act = config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise VitqError(f"{source}: activation {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


class Layout:
    """One transformers model type: its timm constructor and the key names of its checkpoint."""

    model_type: str
    #: architectures of this model type vitq reads -> (checkpoint key prefix, {hf head: timm head}); a model without
    #: a head gives the timm model's pooled features (num_classes 0)
    heads: dict[str, tuple[str, dict[str, str]]]
    #: timm key -> transformers key (after the prefix) outside the blocks
    outer: dict[str, str]
    #: a block's transformers prefix (``{i}``: its index; :meth:`block_prefixes` formats it), its (timm,
    #: transformers) modules, and where q, k and v sit (their weights are concatenated into timm's ``qkv``)
    layer: str
    block: tuple[tuple[str, str], ...]
    qkv: tuple[str, str, str]
    #: transformers key (after the prefix) -> the timm tensors it holds stacked along its first axis, in order
    #: (SigLIP's pooling attention keeps q, k and v in one ``in_proj``, timm's splits q from kv)
    packed: dict[str, tuple[str, ...]] = {}
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
        self.num_classes = self.head_classes(config) if self.head_names else 0
        self.kwargs: dict[str, Any] = {**self.model_kwargs(config), "num_classes": self.num_classes,
                                       **self.timm_kwargs}

    def model_kwargs(self, config: dict) -> dict[str, Any]:
        """The timm constructor's arguments (all but ``num_classes``) for the model ``config`` describes: a ViT's
        here."""
        source = self.source
        hidden = config_field(config, "hidden_size", int, source)
        intermediate = config_field(config, "intermediate_size", int, source)
        return {
            "img_size": config_field(config, "image_size", int, source),
            "patch_size": config_field(config, "patch_size", int, source),
            "in_chans": config.get("num_channels", 3),
            "embed_dim": hidden,
            "depth": config_field(config, "num_hidden_layers", int, source),
            "num_heads": config_field(config, "num_attention_heads", int, source),
            "mlp_ratio": mlp_ratio(intermediate, hidden),
            "qkv_bias": bool(config.get("qkv_bias", True)),
            "norm_layer": partial(nn.LayerNorm, eps=float(config.get("layer_norm_eps", 1e-12))),
            "act_layer": activation(config, source),
        }

    def vision_config(self, config: dict) -> dict:
        """The config of the image model (a vision tower nests it)."""
        return config

    def head_classes(self, config: dict) -> int:
        labels = config.get("id2label") or {}
        return len(labels) or config_field(config, "num_labels", int, self.source)

    def set_input_size(self, side: int) -> None:
        """The image processor gives ``side``-pixel images. A layout whose transformers model resamples its position
        embedding to any input (DINOv2) builds its timm model at that size; the others keep the config's image
        size, the only one their transformers model takes."""

    def build(self) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**self.kwargs)

    def num_blocks(self) -> int:
        """How many transformer blocks the model has, in all."""
        return self.kwargs["depth"]

    def block_prefixes(self, i: int) -> tuple[str, str]:
        """Block ``i``'s key prefix in timm and in the checkpoint (after the model prefix)."""
        return f"blocks.{i}.", self.layer.format(i=i)

    def key_map(self, depth: int, prefix: str) -> dict[str, str]:
        """timm key -> transformers key (base-model tensors under ``prefix``), for every tensor but the
        concatenated ``qkv``."""
        keys = {timm_key: prefix + hf_key for timm_key, hf_key in self.outer.items()}
        for i in range(depth):
            timm_block, hf_block = self.block_prefixes(i)
            for timm_name, hf_name in self.block:
                for tensor in ("weight", "bias"):
                    keys[f"{timm_block}{timm_name}.{tensor}"] = f"{prefix}{hf_block}{hf_name}.{tensor}"
        for hf_head, timm_head in self.head_names.items():
            for tensor in ("weight", "bias"):
                keys[f"{timm_head}.{tensor}"] = f"{hf_head}.{tensor}"
        return keys

    def qkv_keys(self, block: int, tensor: str, prefix: str) -> list[str]:
        return [f"{prefix}{self.block_prefixes(block)[1]}{part}.{tensor}" for part in self.qkv]

    def timm_state(self, hf_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state dict from the transformers tensors ``hf_state`` (a missing tensor is one error line;
        a head without a bias gets zeros)."""
        depth = self.num_blocks()
        shapes = {key: value.shape for key, value in model.state_dict().items()}
        first_block = self.block_prefixes(0)[1]
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
                timm_key = f"{self.block_prefixes(i)[0]}attn.qkv.{tensor}"
                state[timm_key] = torch.cat([take(key, timm_key) for key in self.qkv_keys(i, tensor, prefix)])
        for hf_key, timm_keys in self.packed.items():
            value, sizes = take(prefix + hf_key, timm_keys[0]), [shapes[key][0] for key in timm_keys]
            if value.shape[0] != sum(sizes):
                raise VitqError(f"{self.source}: {prefix + hf_key!r} has {value.shape[0]} rows, expected {sum(sizes)}")
            state.update(zip(timm_keys, value.split(sizes), strict=True))
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
