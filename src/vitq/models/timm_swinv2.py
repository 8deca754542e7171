"""Adapter for timm ``SwinTransformerV2`` models (Swin V2-T/S/B/L): shifted-window attention with scaled cosine
attention and a continuous relative position bias, residual post-norm blocks and PatchMerging whose reduction
comes before its norm.

Quantization points (the Swin v1 names): ``patch_embed.proj`` (conv; its input is the image); per stage
``layers.{i}.downsample.reduction`` (stages 1..n only); per block ``layers.{i}.blocks.{j}.attn.qkv``,
``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``; then
``head.fc``. The ``q`` and ``k`` points see the L2-normalised queries and keys (the operands of the cosine
product); the per-head logit scale, the continuous position bias and the shift mask act on the scores in float,
before the ``softmax`` point (:class:`~vitq.nn.attention.QuantCosineWindowAttention`).

Tensor names differ from timm's ``state_dict`` in one place: the separate ``attn.q_bias`` / ``attn.v_bias`` (and
the zero ``k_bias`` buffer) become ``layers.{i}.blocks.{j}.attn.qkv.bias`` (:func:`~vitq.nn.attention.merged_qkv`).
``attn.logit_scale`` and ``attn.cpb_mlp.*`` keep their names; the position-bias MLP is never quantized (it
depends on no input: its output is a constant of the model).

Roles: a v2 block computes ``x + norm1(attn(x))`` and ``x + norm2(mlp(x))``, so ``qkv`` and ``fc1`` read the
residual stream, not a LayerNorm output (role ``act``); PatchMerging's ``reduction`` reads a 2×2 concatenation
of raw tokens (``act``); ``proj`` and ``head.fc`` are ``act`` and ``fc2`` is ``post_gelu``, as in Swin v1.

Stages: ``embed`` (patch embedding and its norm), then for each timm stage its ``downsample`` (when it is not an
``Identity``) followed by each of its blocks, then ``head`` (final norm, pooling, classifier), in the order of
timm's ``SwinTransformerV2Stage.forward`` (downsample first, then blocks).
"""

from __future__ import annotations

from torch import nn

from vitq.models.base import ModelAdapter, Stage, replace_module, wrap_layernorms, wrap_mlp
from vitq.models.registry import register_adapter
from vitq.models.timm_swin import SwinAdapter
from vitq.nn import QConv2d, QLinear
from vitq.nn.attention import QuantCosineWindowAttention


@register_adapter("swinv2")
class SwinV2Adapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        return isinstance(model, SwinTransformerV2)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        replace_module(model, "patch_embed.proj", QConv2d(model.patch_embed.proj, "image"))
        for i, layer in enumerate(model.layers):
            if not isinstance(layer.downsample, nn.Identity):
                replace_module(model, f"layers.{i}.downsample.reduction", QLinear(layer.downsample.reduction, "act"))
            for j, block in enumerate(layer.blocks):
                prefix = f"layers.{i}.blocks.{j}"
                replace_module(model, f"{prefix}.attn", QuantCosineWindowAttention(block.attn))
                wrap_mlp(model, f"{prefix}.mlp", input_role="act")  # post-norm block: fc1 reads the stream
        if isinstance(model.head.fc, nn.Linear):
            replace_module(model, "head.fc", QLinear(model.head.fc, "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        """Swin v1's layout (:meth:`SwinAdapter.stages`): the module tree and forward order are the same."""
        return SwinAdapter.stages(model)

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """None: no LayerNorm of Swin V2 has a Linear as the only reader of its output.

        - ``norm1`` / ``norm2`` are residual post-norms (``x + norm1(attn(x))``): their output is added to the
          stream, and ``qkv`` / ``fc1`` read that sum, not the norm output.
        - ``downsample.norm`` (PatchMerging normalises *after* its reduction) and ``patch_embed.norm`` start a
          stage's residual stream: their output is the first block's ``qkv`` input, but also the residual that
          block adds to. An affine map folded into the norm would change the residual too, and the ``qkv``
          weights cannot undo it there. ``reduction`` itself reads concatenated raw tokens.
        - the final ``norm`` feeds the classifier through pooling (role ``act``, as for Swin v1 and ViT).
        """
        return []
