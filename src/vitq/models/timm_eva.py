"""Adapter for timm ``Eva`` models (EVA, EVA02, and the other ``timm.models.eva`` ViTs built from ``EvaAttention``):
ViT blocks with rotary position embedding (RoPE), separate q/v biases, an optional LayerNorm inside the attention
(``scale_attn_inner``) and the MLP (``scale_mlp``), SwiGLU or GLU MLPs, optional LayerScale, pre-norm
(``EvaBlock``) or post-norm (``EvaBlockPostNorm``) blocks.

Quantization points (the ViT names): ``patch_embed.proj`` (conv; its input is the image); per block
``blocks.{i}.attn.qkv``, ``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj``, then the MLP's
Linears: ``.mlp.fc1_g`` and ``.mlp.fc1_x`` (SwiGLU with separate gate and value Linears, the ``scale_mlp`` EVA02
models) or ``.mlp.fc1`` (plain or packed-GLU MLP), and ``.mlp.fc2``; then ``head`` (when the model has a
classifier). The ``q`` and ``k`` points see the rotated queries and keys
(:class:`~vitq.nn.attention.QuantEvaAttention`); the rotation by the model's fixed sin/cos tables stays float.

Tensor names differ from timm's ``state_dict`` in the attention only: the separate ``attn.q_bias`` / ``attn.v_bias``
(and the zero ``k_bias`` buffer) become ``blocks.{i}.attn.qkv.bias``, and the unfused ``attn.q_proj`` /
``attn.k_proj`` / ``attn.v_proj`` of ``qkv_fused=False`` models are stacked into one ``blocks.{i}.attn.qkv``
Linear (weight and bias), so the point names match ViT's. Everything else keeps timm's names.

Roles: in a pre-norm block ``qkv`` and the first MLP Linear(s) read a LayerNorm output (``post_ln``); in a post-norm
block (``x + norm1(attn(x))``) they read the residual stream (``act``). ``proj`` is ``post_ln`` after the
attention's inner LayerNorm, else ``act``; ``fc2`` is ``post_ln`` after the MLP's LayerNorm, ``act`` after a
gated product, ``post_gelu`` after a GELU (:func:`~vitq.models.base.wrap_mlp`); ``head`` is ``act``.

Not supported (refused with a :class:`~vitq.errors.VitqError`): the ``AttentionRope`` attention of
``attn_type='rope'`` models, gated attention, and RoPE with ``dynamic_img_size`` (the rotation then depends on the
image size, which a block's stage does not know). A ``map`` pooling head (``attn_pool``) stays float.
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.base import (
    ModelAdapter,
    Stage,
    affine_layernorm,
    block_norm_pairs,
    mlp_norm_pairs,
    replace_module,
    wrap_layernorms,
    wrap_mlp,
)
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantEvaAttention


@register_adapter("eva")
class EvaAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        _check_supported(model)
        replace_module(model, "patch_embed.proj", QConv2d(model.patch_embed.proj, "image"))
        for i, block in enumerate(model.blocks):
            input_role = "act" if _post_norm(block) else "post_ln"
            replace_module(model, f"blocks.{i}.attn", QuantEvaAttention(block.attn, qkv_role=input_role))
            wrap_mlp(model, f"blocks.{i}.mlp", input_role)
        if isinstance(model.head, nn.Linear):
            replace_module(model, "head", QLinear(model.head, "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """``embed`` (patch embedding, class/register tokens, absolute positions, ``norm_pre``), each block, ``head``
        (final norm, pooling, ``fc_norm``, classifier). timm's forward computes the rotary embedding once and hands
        it to every block; here each block's stage asks the model's ``rope`` module for it (the same tensor, as the
        grid is fixed), so the stages compose to the forward exactly."""

        def embed(x: torch.Tensor) -> torch.Tensor:
            x, _ = model._pos_embed(model.patch_embed(x))
            return model.norm_pre(x)

        def block_run(i: int, block: nn.Module):
            def run(x: torch.Tensor) -> torch.Tensor:
                rope = _rope(model)
                if rope is not None and getattr(model, "rope_mixed", False):
                    rope = rope[i]  # mixed RoPE: one learned rotation per block
                return block(x, rope=rope)

            return run

        def head(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(x))

        return [
            Stage("embed", ("patch_embed", "norm_pre"), embed),
            *(Stage(f"blocks.{i}", (f"blocks.{i}",), block_run(i, block)) for i, block in enumerate(model.blocks)),
            Stage("head", ("norm", "attn_pool", "fc_norm", "head"), head),
        ]

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """Per pre-norm block ``norm1`` → ``attn.qkv`` and, for a single first MLP Linear, ``norm2`` → ``mlp.fc1``
        (SwiGLU's ``norm2`` feeds both ``fc1_g`` and ``fc1_x``: not listed); in every block ``attn.norm`` →
        ``attn.proj`` (``scale_attn_inner``) and ``mlp.norm`` → ``mlp.fc2`` (``scale_mlp``). Only affine LayerNorms
        are listed.

        A post-norm block's ``norm1`` / ``norm2`` normalise a branch output that is added to the residual stream, so
        they have no Linear as the only reader of their output; its inner ``attn.norm`` / ``mlp.norm`` still have.
        ``fc_norm`` → ``head`` is left out as ViT's ``norm`` → ``head`` is: the classifier input has role ``act``."""
        pairs = []
        for i, block in enumerate(model.blocks):
            path = f"blocks.{i}"
            if _post_norm(block):
                pairs += mlp_norm_pairs(model, f"{path}.mlp")
            else:
                pairs += block_norm_pairs(model, path)
            if affine_layernorm(block.attn.norm):
                pairs.append((f"{path}.attn.norm", f"{path}.attn.proj"))
        return pairs


def _post_norm(block: nn.Module) -> bool:
    """Whether ``block`` is timm's ``EvaBlockPostNorm`` (``x + norm(branch(x))``)."""
    from timm.models.eva import EvaBlockPostNorm

    return isinstance(block, EvaBlockPostNorm)


def _rope(model: nn.Module) -> torch.Tensor | None:
    """The rotary embedding timm's ``Eva._pos_embed`` computes for the model's fixed patch grid (``None``: no RoPE)."""
    if model.rope is None:
        return None
    if hasattr(model.rope, "feat_shape"):
        return model.rope.get_embed()
    return model.rope.get_embed(shape=model.patch_embed.grid_size)


def _check_supported(model: nn.Module) -> None:
    """Refuse, before anything is replaced, the ``Eva`` configurations this adapter cannot quantize."""
    from timm.models.eva import EvaAttention

    if model.rope is not None and model.dynamic_img_size:
        raise VitqError("EVA models with rotary position embedding and dynamic_img_size are not supported: "
                        "create the model with a fixed image size")
    for i, block in enumerate(model.blocks):
        if not isinstance(block.attn, EvaAttention):
            raise VitqError(f"blocks.{i}.attn is {type(block.attn).__name__}, but the eva adapter supports "
                            "EvaAttention only (attn_type='eva')")
        if block.attn.gate is not None:
            raise VitqError(f"blocks.{i}.attn is gated (gated_attn=True), which the eva adapter does not support")
