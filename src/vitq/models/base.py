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


def wrap_mlp(model: nn.Module, path: str, input_role: str = "post_ln") -> None:
    """Wrap the Linear layers of the timm MLP at ``path`` (``Mlp``, ``GluMlp`` or ``SwiGLU``).

    The first Linear(s) (``fc1``, or SwiGLU's ``fc1_g`` and ``fc1_x``) read the block's input: a LayerNorm output in
    a pre-norm block (``post_ln``), the residual stream in a post-norm one (``input_role="act"``).
    ``fc2``'s input is ``post_ln`` when the MLP normalises its hidden activation (``scale_mlp`` models:
    EVA02, BEiT v2 variants), ``post_gelu`` after a plain GELU-type activation, and ``act`` after a gated
    product (GLU/SwiGLU), whose values are signed and have no GELU floor.
    """
    from timm.layers import GluMlp, SwiGLU

    from vitq.nn import QLinear

    mlp = model.get_submodule(path)
    gated = isinstance(mlp, (GluMlp, SwiGLU))
    for name in ("fc1_g", "fc1_x") if isinstance(mlp, SwiGLU) else ("fc1",):
        replace_module(model, f"{path}.{name}", QLinear(getattr(mlp, name), input_role))
    fc2_role = "post_ln" if _has_layernorm(mlp) else "act" if gated else "post_gelu"
    replace_module(model, f"{path}.fc2", QLinear(mlp.fc2, fc2_role))


def block_norm_pairs(model: nn.Module, path: str) -> list[tuple[str, str]]:
    """The fold pairs of the pre-norm transformer block at ``path``: ``norm1`` → ``attn.qkv`` (a fused qkv),
    ``norm2`` → ``mlp.fc1`` (one first Linear: SwiGLU's two would need one fold shared by both) and
    :func:`mlp_norm_pairs`. Only affine LayerNorms are listed."""
    block = model.get_submodule(path)
    pairs = []
    for norm, parent, linear in (("norm1", "attn", "qkv"), ("norm2", "mlp", "fc1")):
        if affine_layernorm(getattr(block, norm, None)) and hasattr(getattr(block, parent), linear):
            pairs.append((f"{path}.{norm}", f"{path}.{parent}.{linear}"))
    return pairs + mlp_norm_pairs(model, f"{path}.mlp")


def mlp_norm_pairs(model: nn.Module, path: str) -> list[tuple[str, str]]:
    """``[(path.norm, path.fc2)]`` when the MLP at ``path`` normalises its hidden activation with an affine
    LayerNorm (whose output is then ``fc2``'s whole input), else ``[]``."""
    return [(f"{path}.norm", f"{path}.fc2")] if affine_layernorm(model.get_submodule(path).norm) else []


def affine_layernorm(module: nn.Module | None) -> bool:
    """Whether ``module`` is an ``nn.LayerNorm`` with a gain and a bias (the norms the RepQ-style fold needs)."""
    return isinstance(module, nn.LayerNorm) and module.weight is not None and module.bias is not None


def _has_layernorm(mlp: nn.Module) -> bool:
    return isinstance(getattr(mlp, "norm", None), nn.LayerNorm)


def fold_batchnorm(model: nn.Module, layer_path: str, bn_path: str) -> None:
    """Fold the eval-mode BatchNorm at ``bn_path`` into the Conv2d or Linear at ``layer_path`` that feeds it, in
    place: ``bn(layer(x)) = layer'(x)`` with ``W' = W·γ/σ`` (per output channel) and ``b' = (b − μ)·γ/σ + β``.

    Quantizing a layer whose output is then renormalised would quantize weights the model never uses as such, so
    hybrid CNN-ViT adapters fold every BatchNorm first (the deployed form of these models). The BatchNorm is replaced
    by what it does besides normalising: nothing (``nn.Identity``), or the dropout and activation of timm's
    ``BatchNormAct2d``. A BatchNorm1d after a Linear normalises its output features (LeViT's ``LinearNorm``)."""
    layer, bn = model.get_submodule(layer_path), model.get_submodule(bn_path)
    if not isinstance(layer, nn.Conv2d | nn.Linear) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"cannot fold {type(bn).__name__} at {bn_path} into {type(layer).__name__} at {layer_path}")
    if bn.num_features != layer.weight.shape[0]:
        raise ValueError(f"{bn_path} normalises {bn.num_features} channels, {layer_path} makes {layer.weight.shape[0]}")
    with torch.no_grad():
        gain, shift = _batchnorm_affine(bn)
        bias = shift if layer.bias is None else layer.bias * gain + shift
        layer.weight.mul_(gain.view(-1, *([1] * (layer.weight.dim() - 1))))
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype))
    rest = [getattr(bn, name) for name in ("drop", "act") if isinstance(getattr(bn, name, None), nn.Module)]
    replace_module(model, bn_path, nn.Sequential(*rest) if rest else nn.Identity())


def fold_batchnorm_into_next_linear(model: nn.Module, bn_path: str, linear_path: str) -> None:
    """Fold the eval-mode BatchNorm1d at ``bn_path`` into the Linear at ``linear_path`` that reads it (a classifier
    that normalises its input: LeViT's and EfficientViT's ``NormLinear``; a dropout between them is the identity
    in eval), in place: ``linear(bn(x)) = W'x + b'`` with ``W' = W·diag(γ/σ)`` (per input feature) and
    ``b' = W(β − μ·γ/σ) + b``. The BatchNorm becomes ``nn.Identity``."""
    bn, linear = model.get_submodule(bn_path), model.get_submodule(linear_path)
    if not isinstance(linear, nn.Linear) or not isinstance(bn, nn.BatchNorm1d):
        raise TypeError(f"cannot fold {type(bn).__name__} at {bn_path} into {type(linear).__name__} at {linear_path}")
    if bn.num_features != linear.in_features:
        raise ValueError(f"{bn_path} normalises {bn.num_features} features, {linear_path} reads {linear.in_features}")
    with torch.no_grad():
        gain, shift = _batchnorm_affine(bn)
        bias = linear.weight @ shift
        if linear.bias is not None:
            bias = bias + linear.bias
        linear.weight.mul_(gain.to(linear.weight.dtype))
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
    replace_module(model, bn_path, nn.Identity())


def fold_conv_batchnorms(model: nn.Module, norm: str = "bn") -> None:
    """Fold the BatchNorm of every conv-norm pair (a module with ``conv`` and ``bn`` children: timm's
    ``ConvNormAct``, EfficientViT's ``ConvNorm``; ``norm`` names the BatchNorm child where a family calls it
    otherwise, e.g. ``"norm"`` in EfficientViT MIT's ``ConvNormAct``) into its convolution; a one-line error if any
    other BatchNorm remains (one that no convolution feeds directly)."""
    from vitq.errors import VitqError

    for name, module in list(model.named_modules()):
        conv, bn = getattr(module, "conv", None), getattr(module, norm, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
            fold_batchnorm(model, f"{name}.conv" if name else "conv", f"{name}.{norm}" if name else norm)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise VitqError(f"cannot fold the BatchNorm at {name}: no convolution feeds it directly")


def _batchnorm_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ/σ, β − μ·γ/σ)``: the per-channel gain and shift an eval-mode BatchNorm applies."""
    gain = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        gain = gain * bn.weight
    shift = -bn.running_mean * gain
    if bn.bias is not None:
        shift = shift + bn.bias
    return gain, shift
