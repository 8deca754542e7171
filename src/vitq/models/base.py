"""Model adapters: how a model family exposes its quantization points and its stages.

An adapter knows one family's module layout (timm ViT/DeiT, timm Swin, ...). It

1. ``wrap``s a float model in place, replacing Linear/Conv/attention modules with the
   quantization points of :mod:`vitq.nn` (names follow the timm module names, e.g.
   ``blocks.3.attn.softmax``);
2. lists the model's ``stages``: consecutive pieces (embedding, each block, head) whose
   composition is the model's forward. Calibration runs stage by stage so that only one stage's
   activations for the calibration set are held in memory.

Adapters never know about methods; methods never reach into a family's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    """A consecutive piece of the forward pass.

    ``modules`` are the module paths (relative to the model) whose quantization points belong to
    this stage; ``run`` maps the stage input to its output.
    """

    name: str
    modules: tuple[str, ...]
    run: Callable[[torch.Tensor], torch.Tensor]

    def contains(self, path: str) -> bool:
        """Whether the module at dotted ``path`` belongs to this stage."""
        return any(path == m or path.startswith(m + ".") for m in self.modules)


class ModelAdapter:
    """Base class of model-family adapters (see module docstring)."""

    family: ClassVar[str] = ""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        raise NotImplementedError

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        raise NotImplementedError

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """``(layernorm, linear)`` module paths where the LayerNorm's output is the Linear's whole
        input, up to a permutation of tokens (the targets of RepQ-ViT's scale reparameterization,
        docs/methods/repq-vit.md#post-layernorm-scale-reparameterization). A per-channel affine map of the LayerNorm
        output can then be folded into the LayerNorm's affine parameters and the Linear's weight columns and bias.
        Forward order."""
        raise NotImplementedError


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``root`` by ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def wrap_layernorms(model: nn.Module) -> None:
    """Replace every ``nn.LayerNorm`` of ``model`` by a :class:`~vitq.nn.QLayerNorm` (an input quantization
    point, role ``pre_ln``, float unless a method quantizes it; same parameters and state_dict keys)."""
    from vitq.nn import QLayerNorm

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm) and not isinstance(module, QLayerNorm):
            replace_module(model, name, QLayerNorm(module))
