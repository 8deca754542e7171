"""Explicit multi-head attention with quantization points on q, k, v and the softmax output.

timm's ``Attention`` uses ``F.scaled_dot_product_attention`` when fused attention is enabled,
which silently bypasses any quantizer placed on the attention map. These modules always compute
``softmax(q kᵀ · scale + bias) v`` step by step, with the same attribute names as timm so the
checkpoint keys do not change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitq.nn.modules import QAct, QLinear


class QuantAttentionBase(nn.Module):
    """Shared q/k/v/softmax quantization points and the explicit attention product."""

    def _init_points(self) -> None:
        self.q = QAct("attn_q")
        self.k = QAct("attn_k")
        self.v = QAct("attn_v")
        self.softmax = QAct("softmax")

    def _attend(self, q, k, v, bias: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None,
                attn_drop: nn.Module) -> torch.Tensor:
        """``softmax(Q(q·scale) Q(k)ᵀ + bias) → Q → @ Q(v)`` for [B, heads, N, head_dim] inputs.

        ``bias`` is a tensor added to the scores, or a function of the scores (to reproduce a
        reference implementation's exact order of additions).
        """
        attn = self.q(q * self.scale) @ self.k(k).transpose(-2, -1)
        if callable(bias):
            attn = bias(attn)
        elif bias is not None:
            attn = attn + bias
        # v is quantized before the attention map so that, during forward-order calibration, the
        # softmax quantizer can be chosen by the error of its real consumer value_weights(Q(A))·Q(v)
        v = self.v(v)
        attn = self.softmax(attn.softmax(dim=-1))
        return attn_drop(self.value_weights(attn)) @ v

    def value_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """The weights of the values ``v`` from the softmax point's output ``probs`` [B, heads, N, N']: ``probs``
        itself. The softmax point's consumer is ``value_weights(probs) @ v``; output-error searches of the softmax
        quantizer use it, and attention that transforms the probabilities first (talking heads) overrides it."""
        return probs


class QuantAttention(QuantAttentionBase):
    """Replacement for ``timm.layers.Attention`` (ViT, DeiT, ...)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated attention is not supported")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = attn.num_heads * attn.head_dim
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention masks are not supported by quantized attention")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self._attend(self.q_norm(q), self.k_norm(k), v, None, self.attn_drop)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(QuantAttentionBase):
    """Replacement for timm Swin's ``WindowAttention`` (relative position bias, shifted-window mask).

    Keeps timm's attribute names, so the ``state_dict`` keys are unchanged:
    ``qkv``, ``relative_position_bias_table``, ``proj`` (``relative_position_index`` is a
    non-persistent buffer, as in timm). Follows timm's non-fused path step by step.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.dim = attn.dim
        self.window_size, self.window_area = tuple(attn.window_size), attn.window_area
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """[1, heads, N, N] bias gathered from the table (as timm's ``WindowAttention``)."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous()
        return bias.unsqueeze(0)

    def set_window_size(self, window_size) -> None:
        raise NotImplementedError("resize the timm model before wrapping it for quantization")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: [num_windows*B, N, C]; ``mask``: (0/-inf) [num_windows, N, N] or ``None``."""
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        def add_bias(attn: torch.Tensor) -> torch.Tensor:
            attn = attn + self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            return attn

        x = self._attend(q, k, v, add_bias, self.attn_drop)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


def merged_qkv(qkv: nn.Linear, q_bias: torch.Tensor | None, k_bias: torch.Tensor | None,
               v_bias: torch.Tensor | None) -> nn.Linear:
    """``qkv`` with the separate q/k/v biases of BEiT/EVA-style attention merged into its own bias.

    Those models keep the qkv Linear bias-free and add ``cat(q_bias, 0, v_bias)`` in their forward; a plain
    biased Linear computes the same, and every method, fold and export then handles it like ViT's ``qkv``.
    A missing part of the bias is zero (BEiT's ``k_bias`` is a zero buffer)."""
    if q_bias is None and k_bias is None and v_bias is None:
        return qkv
    parts = [b if b is not None else torch.zeros(qkv.out_features // 3, dtype=qkv.weight.dtype,
                                                  device=qkv.weight.device) for b in (q_bias, k_bias, v_bias)]
    bias = torch.cat([b.detach() for b in parts])
    if qkv.bias is not None:
        bias = bias + qkv.bias.detach()
    merged = nn.Linear(qkv.in_features, qkv.out_features, bias=True, device="meta")
    merged.weight = qkv.weight
    merged.bias = nn.Parameter(bias.clone())
    return merged


def stacked_linear(linears: tuple[nn.Linear, ...]) -> nn.Linear:
    """One Linear computing ``cat([linear(x) for linear in linears], -1)``: the weights stacked along the output
    axis, the biases concatenated (a missing bias is zero; none at all gives a bias-free Linear)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    stacked.weight = nn.Parameter(weight)
    if any(linear.bias is not None for linear in linears):
        stacked.bias = nn.Parameter(torch.cat([
            linear.bias.detach() if linear.bias is not None else weight.new_zeros(linear.out_features)
            for linear in linears]))
    return stacked


class QuantRelPosAttention(QuantAttentionBase):
    """Replacement for timm BEiT's ``Attention``: global attention over all tokens with an optional learned
    relative position bias (own table, and/or one shared by all blocks passed to ``forward``).

    The q/v biases are merged into ``qkv.bias`` (:func:`merged_qkv`); the table and its index keep timm's names.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.window_size = attn.window_size
        self.relative_position_bias_table = attn.relative_position_bias_table
        index = attn.relative_position_index
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = QLinear(merged_qkv(attn.qkv, attn.q_bias, attn.k_bias, attn.v_bias), "post_ln")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """[1, heads, N, N] bias gathered from the table (N = window area + the class token), as timm's."""
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

        def add_bias(attn: torch.Tensor) -> torch.Tensor:
            if self.relative_position_bias_table is not None:
                attn = attn + self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                attn = attn + shared_rel_pos_bias
            return attn

        x = self._attend(q, k, v, add_bias, self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


class QuantCosineWindowAttention(QuantAttentionBase):
    """Replacement for timm Swin V2's ``WindowAttention``: scaled cosine attention with a continuous relative
    position bias and the shifted-window mask, following timm's non-fused path step by step.

    Scores: ``(normalize(q) · normalize(k)ᵀ) · exp(min(logit_scale, log 100)) + 16·sigmoid(cpb) (+ mask)``. The
    ``q`` and ``k`` points see the L2-normalised queries and keys, the operands of the product (``scale`` is 1);
    the learned per-head logit scale multiplies the product after it, as in timm, so the float output is timm's
    exactly. The position bias comes from the small MLP ``cpb_mlp`` over the fixed log-spaced coordinate table; it
    depends on no input, so it stays float, like the relative position tables of Swin v1 and BEiT.

    Keeps timm's attribute names: ``logit_scale``, ``cpb_mlp``, ``qkv``, ``proj`` (``relative_coords_table`` and
    ``relative_position_index`` are non-persistent buffers, as in timm). The separate q/v biases are merged into
    ``qkv.bias`` (:func:`merged_qkv`). ``qkv`` reads the residual stream of a post-norm block: role ``act``.
    """

    def __init__(self, attn: nn.Module) -> None:
        import math

        super().__init__()
        self.dim = attn.dim
        self.window_size = tuple(attn.window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.pretrained_window_size = tuple(attn.pretrained_window_size)
        self.num_heads = attn.num_heads
        self.scale = 1.0  # no head_dim^-1/2: the per-head logit scale multiplies the cosine scores instead
        self.max_logit_scale = math.log(1.0 / 0.01)
        self.logit_scale = attn.logit_scale
        self.cpb_mlp = attn.cpb_mlp
        self.register_buffer("relative_coords_table", attn.relative_coords_table, persistent=False)
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = QLinear(merged_qkv(attn.qkv, attn.q_bias, attn.k_bias, attn.v_bias), "act")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """[1, heads, N, N] bias ``16·sigmoid(cpb_mlp(table))`` gathered by the relative position index."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(self.window_area, self.window_area, -1)
        bias = bias.permute(2, 0, 1).contiguous()
        return (16 * torch.sigmoid(bias)).unsqueeze(0)

    def _get_logit_scale(self) -> torch.Tensor:
        """[heads, 1, 1] multiplier of the cosine scores, ``exp(logit_scale)`` clamped at 100."""
        return torch.clamp(self.logit_scale, max=self.max_logit_scale).exp()

    def set_window_size(self, window_size) -> None:
        raise NotImplementedError("resize the timm model before wrapping it for quantization")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: [num_windows*B, N, C]; ``mask``: (0/-100) [num_windows, N, N] or ``None``."""
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        def scale_and_bias(attn: torch.Tensor) -> torch.Tensor:
            attn = attn * self._get_logit_scale()
            attn = attn + self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            return attn

        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        x = self._attend(q, k, v, scale_and_bias, self.attn_drop)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class QuantEvaAttention(QuantAttentionBase):
    """Replacement for timm EVA's ``EvaAttention``: global attention with rotary position embedding (RoPE) on the
    patch tokens, following timm's non-fused path step by step.

    Order of operations: ``qkv`` → optional per-head ``q_norm`` / ``k_norm`` → RoPE on the q and k of the non-prefix
    tokens (the class/register tokens are not rotated) → ``softmax(Q(q·scale) Q(k)ᵀ) → Q → @ Q(v)`` → optional
    ``norm`` of the merged heads (``scale_attn_inner``) → ``proj``. The ``q`` and ``k`` points see the rotated queries
    and keys, the operands of the product. The rotation tensor is computed once by the model for its grid and passed
    to every block (``rope``), as in timm.

    ``qkv`` is always one biased Linear: EVA's separate q/v biases (the k bias is a zero buffer) are merged into its
    bias (:func:`merged_qkv`), and the unfused ``q_proj`` / ``k_proj`` / ``v_proj`` of ``qkv_fused=False`` models are
    stacked into it, so the point names and every method's handling are ViT's. ``proj`` reads a LayerNorm output
    when ``norm`` is one (role ``post_ln``), else the attention output (``act``). Gated attention is not supported.
    """

    def __init__(self, attn: nn.Module, qkv_role: str = "post_ln") -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated attention is not supported")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = attn.num_heads * attn.head_dim
        self.num_prefix_tokens = attn.num_prefix_tokens
        self.rotate_half = bool(getattr(attn, "rotate_half", False))
        self.qkv = QLinear(self._fused_qkv(attn), qkv_role)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "post_ln" if isinstance(attn.norm, nn.LayerNorm) else "act")
        self.proj_drop = attn.proj_drop

    @staticmethod
    def _fused_qkv(attn: nn.Module) -> nn.Linear:
        """One ``[3·attn_dim, dim]`` Linear computing ``cat(q, k, v)``, whatever layout ``attn`` stores them in."""
        if attn.qkv is not None:
            return merged_qkv(attn.qkv, attn.q_bias, attn.k_bias, attn.v_bias)
        return stacked_linear((attn.q_proj, attn.k_proj, attn.v_proj))

    def _rotate(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """RoPE on the non-prefix tokens of ``x`` [B, heads, N, head_dim]; ``rope`` is ``cat(sin, cos)`` on its last
        axis, for the patch tokens only. Pairs of channels are rotated: interleaved ``(2i, 2i+1)`` by default, the
        two halves ``(i, i + head_dim/2)`` with ``rotate_half``."""
        prefix, tokens = x[:, :, :self.num_prefix_tokens], x[:, :, self.num_prefix_tokens:]
        sin, cos = rope.chunk(2, -1)
        if self.rotate_half:
            first, second = tokens.chunk(2, -1)
            turned = torch.cat([-second, first], -1)
        else:
            turned = torch.stack([-tokens[..., 1::2], tokens[..., ::2]], -1).reshape(tokens.shape)
        rotated = (tokens * cos + turned * sin).to(tokens.dtype)
        return torch.cat([prefix, rotated], dim=2)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x``: [B, N, dim]; ``rope``: the model's rotary embedding for its patch grid, or ``None``."""
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention masks are not supported by quantized attention")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        x = self._attend(q, k, v, None, self.attn_drop)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))


def _mix_heads(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear`` (a [heads, heads] Linear) applied over the head axis of ``x`` [B, heads, N, N']."""
    return linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class QuantTalkingHeadAttention(QuantAttentionBase):
    """Replacement for timm CaiT's ``TalkingHeadAttn``: global attention whose heads are mixed twice, by ``proj_l``
    on the scores before the softmax and by ``proj_w`` on the probabilities after it (talking-heads attention,
    Shazeer et al. 2020), following timm's non-fused path step by step:
    ``softmax(proj_l(Q(q·scale) Q(k)ᵀ)) → Q → proj_w → @ Q(v)``, each mix over the head axis.

    The ``softmax`` point quantizes the probabilities (they sum to 1 over the keys), the tensor the post-softmax
    quantizers are made for; ``proj_w``'s output is a signed mix of them that no longer is a distribution.
    ``proj_w`` is the softmax point's consumer (:meth:`value_weights`), so output-error searches of the softmax
    quantizer measure the error after the mix.

    ``proj_l`` and ``proj_w`` stay float modules, not quantization points: each is heads x heads weights (nothing to
    save by quantizing them), and both act on products of quantized operands rather than on operands: the scores
    ``Q(q)·Q(k)ᵀ`` are mixed before the softmax as a relative position bias is added, and
    ``proj_w(Q(A))·Q(v) = Σ_h' W[h, h'] Q(A_h')·Q(v_h) + b_h Σ Q(v_h)`` is a mix of the products
    ``Q(A_h')·Q(v_h)`` of quantized operands. Keeps timm's attribute names (``qkv``, ``proj_l``, ``proj_w``,
    ``proj``), so the ``state_dict`` keys are unchanged.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.attn_drop = attn.attn_drop
        self.proj_l = attn.proj_l
        self._init_points()  # registered between the two head mixes and before proj: module order = forward order
        self.proj_w = attn.proj_w
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def value_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """``proj_w`` over the heads of the (quantized) probabilities ``probs`` [B, heads, N, N]."""
        return _mix_heads(self.proj_w, probs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self._attend(q, k, v, lambda scores: _mix_heads(self.proj_l, scores), self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class QuantClassAttention(QuantAttentionBase):
    """Replacement for timm CaiT's ``ClassAttn``: the class token (token 0) attends to every token,
    ``softmax(Q(q_cls·scale) Q(k)ᵀ) → Q → @ Q(v)``, and only its output is returned ([B, 1, dim]).

    timm's separate ``q``, ``k`` and ``v`` Linears would take the names of the ``q``/``k``/``v`` quantization points;
    they are stacked into one ``qkv`` Linear (:func:`stacked_linear`), so the points are named as ViT's and every
    method handles this ``qkv`` as ViT's. A quantized model's ``state_dict`` therefore differs from timm's here:
    ``attn.q.*``, ``attn.k.*``, ``attn.v.*`` become ``attn.qkv.weight`` / ``attn.qkv.bias``. ``qkv`` computes a query
    for every token; only the class token's is used, the same function as timm's ``q(x[:, 0])``, and the ``q`` point
    sees only that one ([B, heads, 1, head_dim]).
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.qkv = QLinear(stacked_linear((attn.q, attn.k, attn.v)), "post_ln")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``cat(class token, patch tokens)`` [B, N, dim] → the class token's attention output [B, 1, dim]."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x_cls = self._attend(q[:, :, :1], k, v, None, self.attn_drop)
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, C)))
