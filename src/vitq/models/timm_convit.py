"""Adapter for timm ``ConVit`` models (ConViT): a ViT whose first ``local_up_to_layer`` blocks use gated positional
self-attention (GPSA) on the patch tokens only; the class token is prepended after them, and the remaining blocks
use plain multi-head self-attention (MHSA); then the final norm and the classifier.

Quantization points (the ViT names): ``patch_embed.proj`` (conv; its input is the image); per block
``blocks.{i}.attn.qkv``, ``.attn.q``, ``.attn.k``, ``.attn.v``, ``.attn.softmax``, ``.attn.proj``, ``.mlp.fc1``,
``.mlp.fc2``; then ``head``.

GPSA blocks (:class:`~vitq.nn.attention.QuantGatedPositionalAttention`): the ``softmax`` point quantizes the final
attention map that multiplies v, the gated mix of the content probabilities ``softmax(Q(q·scale)·Q(k)ᵀ)`` and the
positional probabilities, renormalised. Stay float: the content softmax before the mix, the positional scores
(``pos_proj``, a 3 → heads Linear over the fixed table of patch offsets: they depend on no input) and their softmax,
the per-head gate ``gating_param`` and the renormalisation. MHSA blocks are timm ViT attention without q/k norms and
use :class:`~vitq.nn.QuantAttention`.

Tensor names differ from timm's ``state_dict`` in the GPSA blocks only: the separate ``attn.qk`` and ``attn.v``
Linears are stacked into one ``blocks.{i}.attn.qkv`` (:func:`~vitq.nn.attention.stacked_linear`; timm's ``attn.v``
would also take the name of the ``v`` quantization point). ``pos_embed``, ``cls_token``, ``pos_proj`` and
``gating_param`` keep their names and stay float, as constants of the model.

Roles: ``qkv`` and ``fc1`` read a LayerNorm output (``post_ln``), ``fc2`` a GELU output (``post_gelu``), ``proj``
and ``head`` ``act``.

Stages: ``embed`` (patch embedding, absolute positions), each GPSA block, ``cls_token`` (prepends the class token: no
quantization point; only when the model has MHSA blocks, where timm prepends it), each MHSA block, ``head``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.base import ModelAdapter, Stage, block_norm_pairs, replace_module, wrap_layernorms, wrap_mlp
from vitq.models.registry import register_adapter
from vitq.nn import QConv2d, QLinear, QuantAttention
from vitq.nn.attention import QuantGatedPositionalAttention


@register_adapter("convit")
class ConvitAdapter(ModelAdapter):
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.convit import ConVit

        return isinstance(model, ConVit)

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        from timm.layers import PatchEmbed
        from timm.models.convit import GPSA

        if not isinstance(model.patch_embed, PatchEmbed):
            raise VitqError("ConViT with a hybrid CNN backbone (hybrid_backbone=...) is not supported by the convit "
                            "adapter")
        replace_module(model, "patch_embed.proj", QConv2d(model.patch_embed.proj, "image"))
        for i, block in enumerate(model.blocks):
            attn = block.attn
            wrapped = QuantGatedPositionalAttention(attn) if isinstance(attn, GPSA) else \
                QuantAttention(_vit_attention_view(attn))
            replace_module(model, f"blocks.{i}.attn", wrapped)
            wrap_mlp(model, f"blocks.{i}.mlp")
        if isinstance(model.head, nn.Linear):
            replace_module(model, "head", QLinear(model.head, "act"))
        wrap_layernorms(model)

    @classmethod
    def stages(cls, model: nn.Module) -> list[Stage]:
        def embed(x: torch.Tensor) -> torch.Tensor:
            x = model.patch_embed(x)
            if model.use_pos_embed:
                x = x + model.pos_embed
            return model.pos_drop(x)

        def prepend_cls_token(x: torch.Tensor) -> torch.Tensor:
            return torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)

        stages = [Stage("embed", ("patch_embed",), embed)]
        for i, block in enumerate(model.blocks):
            if i == model.local_up_to_layer and model.cls_token is not None:
                stages.append(Stage("cls_token", (), prepend_cls_token))
            stages.append(Stage(f"blocks.{i}", (f"blocks.{i}",), block))
        stages.append(Stage("head", ("norm", "head"), lambda x: model.forward_head(model.norm(x))))
        return stages

    @classmethod
    def norm_linear_pairs(cls, model: nn.Module) -> list[tuple[str, str]]:
        """Per block ``norm1`` → ``attn.qkv`` (GPSA's stacked q/k/v included: its input is ``norm1``'s output, the
        positional scores read no input) and ``norm2`` → ``mlp.fc1``. ``norm`` → ``head`` is left out as in ViT:
        the classifier input has role ``act``."""
        return [pair for i in range(len(model.blocks)) for pair in block_norm_pairs(model, f"blocks.{i}")]


def _vit_attention_view(attn: nn.Module) -> SimpleNamespace:
    """timm ConViT's ``MHSA`` as the attributes :class:`~vitq.nn.QuantAttention` reads: it is timm ViT's attention
    (one ``qkv`` Linear, ``softmax((q kᵀ)·scale) v``, ``proj``) without q/k norms."""
    return SimpleNamespace(num_heads=attn.num_heads, head_dim=attn.qkv.in_features // attn.num_heads,
                           scale=attn.scale, qkv=attn.qkv, q_norm=nn.Identity(), k_norm=nn.Identity(),
                           attn_drop=attn.attn_drop, proj=attn.proj, proj_drop=attn.proj_drop)
