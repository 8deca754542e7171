"""The product layers of a quantized model, their operands and the task-loss gradients of their outputs.

A product layer computes ``O = op(a, b)`` from two quantizer slots (see :mod:`vitq.methods.ptq4vit.hessian`):

- :class:`LinearProduct` — a ``QLinear``: ``a`` = input (its ``input_quantizer``), ``b`` = weight;
- :class:`ConvProduct` — a ``QConv2d`` (the patch embedding): ``a`` = image, ``b`` = weight;
- :class:`ScoresProduct` — the attention scores ``(q·scale)·kᵀ`` (the ``q`` and ``k`` points);
- :class:`ContextProduct` — the attention output ``A·v`` (the ``softmax`` and ``v`` points; ``proj_w(A)·v`` in
  talking-heads attention).

Each layer registers hooks that capture its operands during a forward pass and the gradient ∂L/∂O during a
backward pass. The scores are never materialised outside the attention module, so their gradient comes from the
softmax input's: ``∂L/∂S = A ⊙ (∂L/∂A − Σ_j A_j ∂L/∂A_j)``; the attention output's is that of ``proj``'s input.

To bound the search cost, the error is evaluated on every ``row_stride``-th token (query token for the
attention products) of each image: :meth:`Product.rows` selects the same rows of an operand ``a`` and of the
output.

:func:`task_gradients` computes ∂L/∂O for the product layers of one stage, with the task loss of PTQ4ViT: the
KL divergence ``Σ p_float · log(p_float / softmax(z))`` between the float model's prediction and the logits
``z`` of the model in which that stage is quantized (straight-through rounding) and the stages after it are
float. At the float model this gradient is identically zero (``softmax(z) = p_float``). PTQ4ViT's example
script (``HessianQuantCalibrator(..., sequential=False)``) puts every calibrated layer back in float mode before
the next layer's backward pass, so the logits it differentiates are the float ones up to floating-point noise and
its "Hessian" weights are that noise. Here the stage's own quantization (and, with quantized inputs, the
quantized stages before it) makes the gradient informative, also for the first stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib.learnable import StraightThrough
from vitq.calib.runner import run_batched
from vitq.errors import VitqError
from vitq.models import Stage
from vitq.nn import QAct, QConv2d, QLinear, QuantAttentionBase
from vitq.quantizers.base import Quantizer

Sink = Callable[[torch.Tensor], None]
Hooks = list[torch.utils.hooks.RemovableHandle]


class Product:
    """Base class: ``name``, the two quantizers, the search order and the row selection."""

    #: operand searched first in each round: the weight for Linear/conv, A for the matmuls (PTQ4ViT's order)
    first = "a"
    #: output dim along which the weight's output channels lie (None: ``b`` is not a weight)
    b_channel_dim: int | None = None

    def __init__(self, name: str, a_quantizer: Quantizer | None, b_quantizer: Quantizer | None,
                 row_stride: int) -> None:
        self.name, self.a_quantizer, self.b_quantizer, self.row_stride = name, a_quantizer, b_quantizer, row_stride

    def op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of operand ``a`` (or of the output) that the error is evaluated on."""
        return t

    def weight(self) -> torch.Tensor | None:
        """``b`` when it is a parameter (not captured)."""
        return None

    def operand_hooks(self, a_sink: Sink, b_sink: Sink) -> Hooks:
        """Hooks that pass the float operands (before their quantizers) to the sinks, batch by batch."""
        raise NotImplementedError

    def gradient_hooks(self, sink: Sink) -> Hooks:
        """Hooks that pass ``rows(∂L/∂O)`` to ``sink`` during backward, batch by batch."""
        raise NotImplementedError


def token_rows(t: torch.Tensor, stride: int) -> torch.Tensor:
    """``[batch, tokens..., C]`` → every ``stride``-th token of each sample, flattened to ``[rows, C]``;
    a 2-D ``[batch, C]`` (the head) is kept whole."""
    if t.ndim <= 2:
        return t
    return t.reshape(t.shape[0], -1, t.shape[-1])[:, ::stride].reshape(-1, t.shape[-1])


def _output_grad_hook(module: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor], sink: Sink):
    def hook(_module, _args, output):
        output.register_hook(lambda grad: sink(transform(grad).detach().clone()))

    return module.register_forward_hook(hook)


class _WeightProduct(Product):
    """A layer ``op(x, W)`` with a weight: the input is captured by a hook, the weight is the parameter."""

    first = "b"

    def __init__(self, name: str, module: QLinear | QConv2d, row_stride: int) -> None:
        super().__init__(name, module.input_quantizer, module.weight_quantizer, row_stride)
        self.module = module

    def weight(self):
        return self.module.weight.detach()

    def operand_hooks(self, a_sink, b_sink):
        return [self.module.register_forward_pre_hook(lambda _m, args: a_sink(args[0].detach()))]

    def gradient_hooks(self, sink):
        return [_output_grad_hook(self.module, self.rows, sink)]


class LinearProduct(_WeightProduct):
    b_channel_dim = -1

    def op(self, a, b):
        return F.linear(a, b)

    def rows(self, t):
        return token_rows(t, self.row_stride)


class ConvProduct(_WeightProduct):
    b_channel_dim = 1

    def op(self, a, b):
        m = self.module
        return F.conv2d(a, b, None, m.stride, m.padding, m.dilation, m.groups)


class _AttentionProduct(Product):
    def __init__(self, name: str, attn: QuantAttentionBase, a_point: QAct, b_point: QAct, row_stride: int) -> None:
        super().__init__(name, a_point.quantizer, b_point.quantizer, row_stride)
        self.attn, self.a_point, self.b_point = attn, a_point, b_point

    def rows(self, t):
        return t[:, :, ::self.row_stride]  # [batch, heads, queries, ...]

    def operand_hooks(self, a_sink, b_sink):
        return [self.a_point.register_forward_pre_hook(lambda _m, args: a_sink(args[0].detach())),
                self.b_point.register_forward_pre_hook(lambda _m, args: b_sink(args[0].detach()))]


def softmax_input_grad(probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """∂L/∂S from ``A = softmax(S)`` (last dim) and ``∂L/∂A``: ``A ⊙ (∂L/∂A − Σ_j A_j ∂L/∂A_j)``."""
    return probs * (grad - (grad * probs).sum(dim=-1, keepdim=True))


class ScoresProduct(_AttentionProduct):
    """``S = (q·scale)·kᵀ`` (the softmax's input, up to an additive bias). Its gradient comes through the softmax
    of ``S``: the ``softmax`` point's input, or the input of the module's ``score_probs`` where the attention mixes
    ``softmax(S)`` with other probabilities before that point (ConViT's gated positional attention)."""

    def __init__(self, name: str, attn: QuantAttentionBase, row_stride: int) -> None:
        super().__init__(name, attn, attn.q, attn.k, row_stride)

    def op(self, a, b):
        return a @ b.transpose(-2, -1)

    def gradient_hooks(self, sink):
        def capture(_module, args):
            probs = args[0]

            probs.register_hook(lambda grad: sink(self.rows(softmax_input_grad(probs.detach(), grad)).clone()))

        probs_module = getattr(self.attn, "score_probs", None)
        return [(self.attn.softmax if probs_module is None else probs_module).register_forward_pre_hook(capture)]


class ContextProduct(_AttentionProduct):
    """``O = w(A)·v``, ``w`` the module's ``value_weights`` (the identity, or talking heads' ``proj_w`` head mix);
    its gradient is that of ``proj``'s input ``O`` as [batch, tokens, heads·head_dim], split into the heads as
    ``O`` is laid out: [batch, heads, tokens, head_dim], or [batch, heads, head_dim, tokens] for attention whose
    ``attends_over_channels`` is true (XCiT's cross-covariance attention). Attention whose ``proj`` does not read
    ``O`` (MobileViT v2's separable attention, EfficientViT (MSRA)'s cascaded heads) passes ``O`` through an
    identity submodule ``context``; the gradient of that module's output is ``O``'s."""

    def __init__(self, name: str, attn: QuantAttentionBase, row_stride: int) -> None:
        if getattr(attn, "context", None) is None and attn.norm_before_proj():
            raise VitqError(f"{name}: attention with a norm before proj is not supported by the Hessian search")
        super().__init__(name, attn, attn.softmax, attn.v, row_stride)

    def op(self, a, b):
        return self.attn.value_weights(a) @ b

    def gradient_hooks(self, sink):
        if getattr(self.attn, "context", None) is not None:
            return [_output_grad_hook(self.attn.context, self.rows, sink)]
        heads = self.attn.num_heads
        # attention over channels (XCiT's) outputs [batch, heads, head_dim, tokens], the transpose
        over_channels = getattr(self.attn, "attends_over_channels", False)

        def as_output(grad: torch.Tensor) -> torch.Tensor:
            split = grad.reshape(grad.shape[0], grad.shape[1], heads, -1).transpose(1, 2)
            return split.transpose(-2, -1) if over_channels else split

        def capture(_module, args):
            x = args[0]
            x.register_hook(lambda grad: sink(self.rows(as_output(grad)).clone()))

        return [self.attn.proj.register_forward_pre_hook(capture)]


def stage_products(qmodel, stage: Stage, row_stride: int) -> list[Product]:
    """The product layers of ``stage`` with at least one quantizer, in forward order."""
    products: list[Product] = []
    root = qmodel.model
    for name, module in root.named_modules():
        if not stage.contains(name):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else None
        if isinstance(module, QLinear):
            product = LinearProduct(name, module, row_stride)
        elif isinstance(module, QConv2d):
            product = ConvProduct(name, module, row_stride)
        elif isinstance(parent, QuantAttentionBase) and attr == "q":
            product = ScoresProduct(f"{parent_name}.scores", parent, row_stride)
        elif isinstance(parent, QuantAttentionBase) and attr == "softmax":
            product = ContextProduct(f"{parent_name}.context", parent, row_stride)
        else:
            continue
        if product.a_quantizer is not None or product.b_quantizer is not None:
            products.append(product)
    return products


def _removed(hooks: Hooks) -> None:
    for hook in hooks:
        hook.remove()


@torch.no_grad()
def capture_operands(stage: Stage, x: torch.Tensor, product: Product, *,
                     batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of ``product`` when ``stage`` runs on ``x`` (the whole batch; ``b`` = the weight for
    Linear/conv). The quantizers upstream of the product in the stage act as they are set."""
    chunks: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    hooks = product.operand_hooks(chunks["a"].append, chunks["b"].append)
    try:
        run_batched(stage.run, x, batch_size)
    finally:
        _removed(hooks)
    b = product.weight()
    return torch.cat(chunks["a"]), b if b is not None else torch.cat(chunks["b"])


@contextmanager
def _set_attr(objects: Iterable, attr: str, value) -> Iterator[None]:
    objects = list(objects)
    previous = [getattr(o, attr) for o in objects]
    for o in objects:
        setattr(o, attr, value)
    try:
        yield
    finally:
        for o, p in zip(objects, previous, strict=True):
            setattr(o, attr, p)


@contextmanager
def straight_through(slots: Iterable) -> Iterator[None]:
    """The quantizers of ``slots`` wrapped in :class:`~vitq.calib.learnable.StraightThrough` (forward ``Q(x)``,
    gradient of the identity: the rounding's own gradient is zero almost everywhere, which would cut the backward
    pass at the first quantizer); restored on exit."""
    swapped = [(slot, slot.quantizer) for slot in slots if slot.quantizer is not None]
    for slot, quantizer in swapped:
        slot.quantizer = StraightThrough(quantizer)
    try:
        yield
    finally:
        for slot, quantizer in swapped:
            slot.quantizer = quantizer


def task_gradients(qmodel, stage_index: int, x: torch.Tensor, target: torch.Tensor, products: list[Product], *,
                   batch_size: int = 8, output_sink: Sink | None = None) -> dict[str, torch.Tensor]:
    """``rows(∂L/∂O)`` of each product of stage ``stage_index`` on stage input ``x``, with
    ``L = KL(target ‖ softmax(z))`` summed over images (``target``: the float model's probabilities).
    ``output_sink`` also receives ∂L/∂(stage output), batch by batch.

    The stage's quantizers are used as they are (straight-through), every other quantizer is disabled, so the
    stages after this one are float.
    """
    stages = qmodel.stages()
    stage, rest = stages[stage_index], stages[stage_index + 1:]
    grads: dict[str, list[torch.Tensor]] = {p.name: [] for p in products}
    hooks = [h for p in products for h in p.gradient_hooks(grads[p.name].append)]
    own = [slot for slot in qmodel.slots() if stage.contains(slot.name)]
    others = [slot.quantizer for slot in qmodel.slots() if slot.quantizer is not None and not stage.contains(slot.name)]
    trainable = [p for p in qmodel.parameters() if p.requires_grad]
    try:
        with _set_attr(others, "enabled", False), _set_attr(trainable, "requires_grad", False), \
                straight_through(own), torch.enable_grad():
            for xs, ts in zip(x.split(batch_size), target.split(batch_size), strict=True):
                z = stage.run(xs.detach().requires_grad_())
                if output_sink is not None:
                    z.register_hook(lambda grad: output_sink(grad.detach().clone()))
                for later in rest:
                    z = later.run(z)
                F.kl_div(F.log_softmax(z, dim=-1), ts, reduction="sum").backward()
    finally:
        _removed(hooks)
    return {name: torch.cat(chunks) for name, chunks in grads.items()}
