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

from vitq.nn.modules import QAct, QConv2d, QLinear


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

    def norm_before_proj(self) -> bool:
        """Whether a norm sits between the attention output and ``proj`` (EVA's ``scale_attn_inner``), so that
        ``proj`` does not read ``value_weights(probs) @ v`` with the heads merged. Attention whose ``norm`` is
        elsewhere (before ``qkv``) overrides it."""
        return not isinstance(getattr(self, "norm", nn.Identity()), nn.Identity)


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


class QuantTinyVitAttention(QuantAttentionBase):
    """Replacement for timm TinyViT's ``Attention``: attention over the tokens of one window that normalises its own
    input, with a learned bias per head and window offset, following timm's non-fused path step by step:
    ``norm`` → ``qkv`` → per head split into q, k (``key_dim``) and v (``val_dim``) →
    ``softmax(Q(q·scale) Q(k)ᵀ + bias) → Q → @ Q(v)`` → ``proj``.

    The bias is ``attention_biases[:, attention_bias_idxs]`` ([heads, N, N]): a table over the distinct
    ``(|Δrow|, |Δcol|)`` offsets of two window positions, gathered by a fixed index. It depends on no input and is
    added to the scores in float before the softmax point (timm caches the gathered tensor in eval mode; it is
    gathered on every call here, the same values).

    ``norm`` (the LayerNorm before ``qkv``) is ``qkv``'s whole input: ``qkv`` has role ``post_ln`` and
    ``norm`` → ``qkv`` is a fold pair. Keeps timm's attribute names (``norm``, ``qkv``, ``proj``,
    ``attention_biases``; ``attention_bias_idxs`` is a non-persistent buffer, as in timm), and the ``qkv`` rows keep
    timm's per-head ``[q | k | v]`` layout.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.key_dim, self.val_dim, self.out_dim = attn.key_dim, attn.val_dim, attn.out_dim
        self.resolution = tuple(attn.resolution)
        self.norm = attn.norm
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)
        self.attn_drop = nn.Identity()  # timm's TinyViT attention has no attention dropout
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")

    def norm_before_proj(self) -> bool:
        """``False``: ``norm`` normalises the input of ``qkv``; ``proj`` reads the attention output itself."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the tokens of each window [B·windows, N, dim] (timm's block partitions and pads)."""
        B, N, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(B, N, self.num_heads, -1)
        q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3))
        x = self._attend(q, k, v, self.attention_biases[:, self.attention_bias_idxs], self.attn_drop)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.out_dim))


class QuantLinearSelfAttention(QuantAttentionBase):
    """Replacement for timm MobileViT v2's ``LinearSelfAttention`` (separable self-attention, Mehta & Rastegari
    2022), following timm's self-attention path step by step. Input and output are ``[B, dim, P, N]`` (P pixels per
    patch, N patches); the attention runs over the N patches separately for each of the P pixel positions.

    ``qkv_proj`` (a 1×1 convolution) gives one context score per token (``query``), a key and a value. The scores
    are normalised over the patches, ``A = softmax(query)``, the context vector is the A-weighted sum of the keys,
    ``c = Σ_n A_n · key_n``, and the output is ``out_proj(relu(value) ⊙ c)``. There is no N×N map and no q·kᵀ
    product, so there are no ``q`` / ``k`` points. In the ``[batch, heads, queries, keys]`` layout of the other
    attention modules, the P pixel positions are the heads and each has one query: the ``softmax`` point sees
    ``A`` as ``[B, P, 1, N]`` (its last axis sums to 1) and the ``v`` point sees timm's ``key`` as ``[B, P, N, dim]``,
    the operand ``A`` weights, so ``c = value_weights(Q(A)) @ Q(key)`` is the softmax point's consumer as in softmax
    attention (the role ``v`` has there). ``relu(value) ⊙ c`` is an elementwise product; ``out_proj``'s input point
    quantizes its result. ``c`` passes through the identity ``context``, so a search by the context's error can take
    its gradient there (no ``proj`` reads it). Both convolutions keep timm's names and read an activation (role
    ``act``): ``qkv_proj`` a ``GroupNorm1`` output, ``out_proj`` the gated context.

    Cross-attention (timm's ``x_prev``) is not supported.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.embed_dim = attn.embed_dim
        self.qkv_proj = QConv2d(attn.qkv_proj, "act")
        self.attn_drop = attn.attn_drop
        self.v = QAct("attn_v")  # registered before out_proj, v before softmax: module order = forward order
        self.softmax = QAct("softmax")
        self.context = nn.Identity()  # where searches by the context's error (ptq4vit) find its gradient
        self.out_proj = QConv2d(attn.out_proj, "act")
        self.out_drop = attn.out_drop

    def norm_before_proj(self) -> bool:
        """``True``: no ``proj`` reads ``value_weights(probs) @ v`` (``out_proj`` reads it gated by the values)."""
        return True

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: [B, dim, P, N] → [B, dim, P, N]."""
        if x_prev is not None:
            raise NotImplementedError("cross-attention is not supported by quantized linear self-attention")
        query, key, value = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        key = self.v(key.permute(0, 2, 3, 1))  # [B, P, N, dim], quantized before the scores as in _attend
        probs = self.softmax(query.permute(0, 2, 1, 3).softmax(dim=-1))  # [B, P, 1, N]
        context = self.context(self.attn_drop(self.value_weights(probs)) @ key)  # [B, P, 1, dim]
        out = nn.functional.relu(value) * context.permute(0, 3, 1, 2)  # [B, dim, P, N] ⊙ [B, dim, P, 1]
        return self.out_drop(self.out_proj(out))


class QuantXCAttention(QuantAttentionBase):
    """Replacement for timm XCiT's ``XCA`` (cross-covariance attention): each head attends over its channels, not
    over the tokens, following timm's non-fused path step by step.

    Per head, q, k and v are [channels C', tokens N] (``qkv`` split as timm does). q and k are L2-normalised over the
    tokens, the scores are the [C' × C'] cross-covariance ``Q(q̂)·Q(k̂)ᵀ`` times the learned per-head
    ``temperature``, and ``softmax(·) → Q → @ Q(v)`` mixes the channels of v ([C', N]). The ``q`` and ``k`` points see
    the normalised q and k, the operands of the product (``scale`` is 1); the temperature multiplies the product after
    it, in float, as Swin v2's logit scale does, so the float output is timm's exactly. The ``softmax`` point quantizes
    the channel-attention map (rows sum to 1 over the key channels) that multiplies v.

    The attention output is [B, heads, C', N] (channels before tokens, :attr:`attends_over_channels`), merged into
    ``proj``'s input [B, N, heads·C'] as timm does. Keeps timm's attribute names (``temperature``, ``qkv``, ``proj``),
    so the ``state_dict`` keys are unchanged.
    """

    #: the attention output ``value_weights(A) @ v`` is [B, heads, channels, tokens], the transpose of the usual
    #: [B, heads, tokens, channels] layout of ``proj``'s input split into heads
    attends_over_channels = True

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = 1.0  # the per-head temperature multiplies the normalised scores instead
        self.temperature = attn.temperature
        self.qkv = QLinear(attn.qkv, "post_ln")
        self.attn_drop = attn.attn_drop
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: tokens [B, N, dim] → [B, N, dim]."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)  # each [B, heads, C', N]
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        x = self._attend(q, k, v, lambda scores: scores * self.temperature, self.attn_drop)
        return self.proj_drop(self.proj(x.permute(0, 3, 1, 2).reshape(B, N, C)))


class QuantGatedPositionalAttention(QuantAttentionBase):
    """Replacement for timm ConViT's ``GPSA`` (gated positional self-attention), following timm's forward step by
    step: per head, the content probabilities ``softmax(Q(q·scale) Q(k)ᵀ)`` and the positional probabilities
    ``softmax(pos_proj(rel))`` are mixed by the learned gate ``σ = sigmoid(gating_param)``,
    ``(1 − σ)·content + σ·positional``, renormalised over the keys, then ``→ Q → @ Q(v)`` → ``proj``.

    The ``softmax`` point quantizes that final mixed map, the probabilities that multiply v. The content softmax, the
    positional scores and their softmax, the gate and the renormalisation stay float: the positional scores come from
    the small Linear ``pos_proj`` (3 → heads) over the fixed table ``rel`` of patch offsets ``(Δx, Δy, Δx² + Δy²)``,
    so they depend on no input, like a relative position bias; the gate is one number per head. ``score_probs`` (an
    identity) marks the content probabilities, so a search that needs the gradient of the scores (``ptq4vit``'s
    Hessian) takes it through the content softmax rather than through the mix.

    timm's separate ``qk`` (q and k) and ``v`` Linears are stacked into one ``qkv`` Linear
    (:func:`stacked_linear`; timm's ``v`` would also take the name of the ``v`` quantization point), so the points are
    named as ViT's: a quantized model's ``attn.qk.*`` / ``attn.v.*`` tensors become ``attn.qkv.*``. ``pos_proj``,
    ``gating_param`` and ``proj`` keep their names; ``rel_indices`` is a non-persistent buffer, recomputed for the token
    count of the input (a square grid), as in timm.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale, self.dim = attn.num_heads, attn.scale, attn.dim
        self.qkv = QLinear(stacked_linear((attn.qk, attn.v)), "post_ln")
        self.pos_proj = attn.pos_proj
        self.gating_param = attn.gating_param
        self.register_buffer("rel_indices", attn.rel_indices, persistent=False)
        self.attn_drop = attn.attn_drop
        self.score_probs = nn.Identity()
        self._init_points()  # registered before proj so module order = forward order
        self.proj = QLinear(attn.proj, "act")
        self.proj_drop = attn.proj_drop

    def relative_indices(self, num_patches: int) -> torch.Tensor:
        """[1, N, N, 3] offsets ``(Δx, Δy, Δx² + Δy²)`` from patch i to patch j of a square ``√N × √N`` grid in
        row-major order (the table timm's GPSA computes)."""
        side = int(num_patches ** 0.5)
        coords = torch.arange(side, dtype=torch.float32)
        rows, cols = coords.repeat_interleave(side), coords.repeat(side)
        dx, dy = cols.view(1, -1) - cols.view(-1, 1), rows.view(1, -1) - rows.view(-1, 1)
        table = torch.stack((dx, dy, dx ** 2 + dy ** 2), dim=-1).unsqueeze(0)
        return table.to(device=self.qkv.weight.device, dtype=self.qkv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the patch tokens [B, N, dim] of a square grid → [B, N, dim]."""
        B, N, C = x.shape
        if self.rel_indices.shape[1] != N:
            self.rel_indices = self.relative_indices(N)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        positional = self.pos_proj(self.rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2).softmax(dim=-1)
        content = self.score_probs((self.q(q * self.scale) @ self.k(k).transpose(-2, -1)).softmax(dim=-1))
        v = self.v(v)  # quantized before the attention map, as in _attend
        gate = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
        mixed = (1.0 - gate) * content + gate * positional
        probs = self.softmax(mixed / mixed.sum(dim=-1, keepdim=True))
        x = self.attn_drop(self.value_weights(probs)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class _QuantLevitAttentionBase(QuantAttentionBase):
    """What LeViT's two attentions share: the scale multiplies the score product (timm's order, so the ``q`` point
    sees the unscaled queries; ``scale`` is 1) and the learned bias ``attention_biases[:, attention_bias_idxs]``
    ([heads, N_q, N_k], a table over the ``(|Δrow|, |Δcol|)`` offsets of a query and a key position gathered by a
    fixed index) is added to the scaled scores in float before the softmax point. timm caches the gathered bias in
    eval mode; it is gathered on every call here, the same values. The BatchNorms of timm's ``LinearNorm`` layers
    are expected folded (:func:`vitq.models.base.fold_batchnorm`), their Linears wrapped by the adapter."""

    def _init_levit(self, attn: nn.Module) -> None:
        if attn.use_conv:
            raise NotImplementedError("LeViT's conv mode (use_conv=True) is not supported")
        self.num_heads, self.key_dim, self.val_dim = attn.num_heads, attn.key_dim, attn.val_dim
        self.val_attn_dim = attn.val_attn_dim
        self.resolution = tuple(attn.resolution)
        self.scale = 1.0  # timm scales q·kᵀ, not q: score_scale is applied to the product
        self.score_scale = attn.scale
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)
        self.attn_drop = nn.Identity()  # timm's LeViT attention has no attention dropout

    def _scale_and_bias(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.score_scale + self.attention_biases[:, self.attention_bias_idxs]


class QuantLevitAttention(_QuantLevitAttentionBase):
    """Replacement for timm LeViT's ``Attention`` (linear mode), following timm's path step by step:
    ``qkv`` → per head split into q, k (``key_dim``) and v (``val_dim``) →
    ``softmax(Q(q) Q(k)ᵀ · scale + bias) → Q → @ Q(v)`` → ``proj`` (Hardswish, then a Linear).

    Keeps timm's attribute names and modules: ``qkv`` (a ``LinearNorm``), ``proj`` (``act``, ``ln``),
    ``attention_biases`` (``attention_bias_idxs`` is a non-persistent buffer, as in timm). The ``qkv`` rows keep
    timm's per-head ``[q | k | v]`` layout. ``proj``'s input is the attention output with the heads merged (its
    Hardswish comes first, inside ``proj``), as the softmax point's consumers assume.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self._init_levit(attn)
        self.qkv = attn.qkv
        self._init_points()  # registered before proj so module order = forward order
        self.proj = attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, N, dim] tokens of the stage's grid."""
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, self.num_heads, -1)
        q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3))
        x = self._attend(q, k, v, self._scale_and_bias, self.attn_drop)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.val_attn_dim))


class QuantLevitAttentionDownsample(_QuantLevitAttentionBase):
    """Replacement for timm LeViT's ``AttentionDownsample`` (linear mode): attention with subsampling, whose
    queries come from every ``stride``-th token of the grid and whose keys and values come from all tokens, so the
    output has the subsampled grid's tokens:
    ``kv`` → per head k, v; ``q_proj`` (subsample, then a Linear) → per head q;
    ``softmax(Q(q) Q(k)ᵀ · scale + bias) → Q → @ Q(v)`` → ``proj`` (Hardswish, then a Linear to the next width).

    timm's query module ``q`` (``down`` + ``ln``) would take the name of the ``q`` quantization point; it is kept
    as is under the name ``q_proj``, so a quantized model's tensor names differ from timm's there
    (``attn_downsample.q.ln.linear.weight`` → ``attn_downsample.q_proj.ln.linear.weight``). Everything else keeps
    timm's names (``kv``, ``proj``, ``attention_biases``).
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self._init_levit(attn)
        self.stride = attn.stride
        self.kv = attn.kv
        self.q_proj = attn.q
        self._init_points()  # registered before proj so module order = forward order
        self.proj = attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, N, in_dim] tokens of the grid → [B, N_sub, out_dim] tokens of the subsampled grid."""
        B, N, _ = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        q = self.q_proj(x).view(B, -1, self.num_heads, self.key_dim)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        x = self._attend(q, k, v, self._scale_and_bias, self.attn_drop)
        return self.proj(x.transpose(1, 2).reshape(B, -1, self.val_attn_dim))


class QuantCascadedHead(QuantAttentionBase):
    """One head of EfficientViT (MSRA)'s cascaded group attention: ``softmax(Q(q·scale) Q(k)ᵀ + bias) → Q → @ Q(v)``
    over the N pixels of a window, for q, k ([B, key_dim, N]) and v ([B, val_dim, N]) as timm's convolutions
    make them (channels first). They are laid out as one head, [B, 1, N, dim], so the points and every search see
    the layout of the other attention modules; ``A @ v`` is timm's ``v @ attnᵀ`` transposed, and the output is
    [B, val_dim, N] again. ``A @ v`` passes through the identity ``context``: no ``proj`` reads one head's output
    (the heads are concatenated and the next head's input depends on it), so searches by the attention output's
    error (ptq4vit) take its gradient there."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.num_heads, self.scale = 1, scale
        self.attn_drop = nn.Identity()  # timm's cascaded group attention has no attention dropout
        self._init_points()
        self.context = nn.Identity()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``q``, ``k``: [B, key_dim, N]; ``v``: [B, val_dim, N]; ``bias``: [N, N] → [B, val_dim, N]."""
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        return self.context(self._attend(q, k, v, bias, self.attn_drop)).squeeze(1).transpose(1, 2)


class QuantCascadedGroupAttention(nn.Module):
    """Replacement for timm EfficientViT (MSRA)'s ``CascadedGroupAttention``, following timm's forward step by step.

    The input [B, C, H, W] (one window) is split into ``num_heads`` channel groups. Head ``i`` reads its group plus
    the previous head's output (the cascade), makes q, k and v with the 1×1 ``qkvs.{i}`` convolution, refines q
    with the depthwise ``dws.{i}`` convolution, and attends over the H·W pixels with a learned bias per pixel
    offset (:class:`QuantCascadedHead`, its points ``heads.{i}.q`` / ``.k`` / ``.v`` / ``.softmax``). ``proj``
    (ReLU, then a 1×1 convolution) mixes the concatenated head outputs.

    The bias ``attention_biases[:, attention_bias_idxs]`` ([heads, N, N], a table over the distinct
    ``(|Δrow|, |Δcol|)`` offsets) depends on no input: it is added to the scores in float before the softmax point
    (timm caches the gathered tensor in eval mode; it is gathered on every call here, the same values). The
    convolutions are timm's ``ConvNorm`` modules with their BatchNorm already folded (the adapter folds before
    wrapping); their ``conv`` becomes a :class:`~vitq.nn.QConv2d` (role ``act``: a channel group of the block's
    stream plus the previous head's output, a convolution output (q), a ReLU output). Keeps timm's names
    (``qkvs``, ``dws``, ``proj``, ``attention_biases``; ``attention_bias_idxs`` is a non-persistent buffer, as in
    timm); ``heads`` is new and holds no tensor.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.key_dim, self.val_dim, self.attn_ratio = attn.key_dim, attn.val_dim, attn.attn_ratio
        self.resolution = attn.resolution
        self.qkvs, self.dws = attn.qkvs, attn.dws
        for convs in (self.qkvs, self.dws):
            for conv_norm in convs:
                conv_norm.conv = QConv2d(conv_norm.conv, "act")
        self.heads = nn.ModuleList(QuantCascadedHead(attn.scale) for _ in range(attn.num_heads))
        self.proj = attn.proj
        self.proj[1].conv = QConv2d(self.proj[1].conv, "act")  # after proj's ReLU
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)

    def set_resolution(self, resolution: int) -> None:
        raise NotImplementedError("resize the timm model before wrapping it for quantization")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: one window [B, C, H, W] with ``H·W`` the bias table's N → [B, C, H, W]."""
        B, _, H, W = x.shape
        groups = x.chunk(self.num_heads, dim=1)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        outputs = []
        feat = groups[0]
        for i, (qkv, dw, head) in enumerate(zip(self.qkvs, self.dws, self.heads, strict=True)):
            if i > 0:
                feat = feat + groups[i]
            q, k, v = qkv(feat).view(B, -1, H, W).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            feat = head(q.flatten(2), k.flatten(2), v.flatten(2), bias[i]).view(B, self.val_dim, H, W)
            outputs.append(feat)
        return self.proj(torch.cat(outputs, 1))
