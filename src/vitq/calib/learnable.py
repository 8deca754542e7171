"""Differentiable stand-ins for calibrated quantizers, swapped into a block while it is reconstructed
(:mod:`vitq.calib.recon`). Each wraps a calibrated :class:`~vitq.quantizers.Quantizer` and writes what it learned
back (``commit(point)``, given the quantization point that holds it), so the reconstructed model is an ordinary
vitq model again.

- :class:`StraightThrough`: any quantizer, fixed; forward ``Q(x)``, gradient of the identity (STE), so that the
  reconstruction loss reaches the learnable parts upstream of a log or TanQ quantizer too.
- :class:`LearnedStep` (LSQ, Esser et al. 2020): a uniform activation quantizer whose step Δ is a parameter,
  ``x̂ = (clamp(⌊x/Δ⌉ + z, q_min, q_max) − z)·Δ`` with ``⌊·⌉`` straight-through, so ∂x̂/∂Δ is LSQ's
  ``⌊x/Δ⌉ − x/Δ`` inside the range and ``q_min − z`` / ``q_max − z`` outside it. Optionally QDrop (Wei et al.
  2022): during training each element keeps its float value with probability ``drop_prob``. The learned parameter
  is an offset ``p`` in units of the quantizer's mean initial step ``m``: ``Δ = Δ₀ ⊙ (1 + p/m)``. For one step
  (per tensor) that is ``Δ₀ + p``, plain LSQ; for per-channel steps spread over decades (a post-LayerNorm channel
  that hardly varies), Adam, which moves every parameter by about its learning rate, then changes each channel's
  step by the same fraction instead of the same amount, which would make a tiny step negative. With ``relative``
  every step is learned as its log-ratio to its initial value, ``Δ = Δ₀ ⊙ e^p``: Adam then moves each step by
  about the same fraction per iteration whatever its size, so one learning rate changes a 3-bit post-GELU step of
  0.3 and an 8-bit one of 0.01 alike (with LSQ's absolute offset the large step moves 30 times more slowly).
- :class:`AdaRoundWeight` (Nagel et al. 2020): the rounding of every weight is learned,
  ``Ŵ = (clamp(⌊W/Δ⌋ + h(α) + z, q_min, q_max) − z)·Δ`` with the rectified sigmoid
  ``h(α) = clamp(σ(α)·(ζ − γ) + γ, 0, 1)``, ζ = 1.1, γ = −0.1, α initialised so that ``h(α) = W/Δ − ⌊W/Δ⌋``
  (Ŵ = W before clamping); the regulariser ``Σ 1 − |2h − 1|^β`` pushes every h to 0 or 1; hardening takes
  ``h = [α >= 0]`` and writes the on-grid weight ``Ŵ`` into the layer (Δ and z unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.quantizers import Quantizer, UniformQuantizer

#: AdaRound's stretch of the sigmoid: h = clamp(σ(α)(ζ − γ) + γ, 0, 1)
ZETA, GAMMA = 1.1, -0.1


class _StraightThroughQuantize(torch.autograd.Function):
    """``Q(x)`` forward, the identity's gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
        return quantizer(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _LearnedStepQuantize(torch.autograd.Function):
    """``x̂ = (clamp(⌊x/Δ⌉ + z, q_min, q_max) − z)·Δ`` with ``⌊·⌉`` straight-through, and QDrop's ``x̂ = x`` where
    ``keep_float``; the gradients written out instead of left to autograd, which on the composed expression saves
    and revisits about ten full-size intermediates (most of a CPU reconstruction step): one float and one bool
    tensor are saved here.

    - ``∂x̂/∂x = 1`` where the code ``⌊x/Δ⌉ + z`` lies strictly between ``q_min`` and ``q_max`` or the value is
      kept float, else 0 (the gradient of ``torch.clamp``, which counts a code on a bound as clamped);
    - ``∂x̂/∂Δ = (c − z) − (x/Δ)·[inside]`` for a quantized element, ``c`` its clamped code: LSQ's ``⌊x/Δ⌉ − x/Δ``
      inside and ``q_min − z`` / ``q_max − z`` on or beyond a bound; 0 where the value is kept float. Summed over
      the elements that share a step (``Δ`` arrives broadcast against ``x``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int,
                keep_float: torch.Tensor | None) -> torch.Tensor:
        ratio = x / scale
        codes = torch.round(ratio).add_(zero_point)
        inside = (codes > q_min) & (codes < q_max)
        levels = codes.clamp_(q_min, q_max).sub_(zero_point)
        x_hat = levels * scale
        d_scale = levels.sub_(ratio.mul_(inside))  # in place: levels and ratio are not needed any more
        passes = inside
        if keep_float is not None:
            x_hat = torch.where(keep_float, x, x_hat)
            d_scale.masked_fill_(keep_float, 0)
            passes = inside.logical_or_(keep_float)
        ctx.save_for_backward(passes, d_scale)
        ctx.scale_shape = scale.shape
        return x_hat

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        passes, d_scale = ctx.saved_tensors
        grad_x = grad * passes if ctx.needs_input_grad[0] else None
        grad_scale = (grad * d_scale).sum_to_size(ctx.scale_shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_scale, None, None, None, None


class StraightThrough(nn.Module):
    """A fixed quantizer with a straight-through gradient."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StraightThroughQuantize.apply(x, self.quantizer)

    def commit(self, point: nn.Module) -> None:
        """Nothing was learned."""


class LearnedStep(nn.Module):
    """A uniform activation quantizer with a learned step (and QDrop while training)."""

    #: the smallest fraction of its initial value a step may shrink to (keeps it positive)
    MIN_RATIO = 1e-3

    def __init__(self, quantizer: UniformQuantizer, drop_prob: float = 0.0,
                 generator: torch.Generator | None = None, relative: bool = False) -> None:
        super().__init__()
        self.relative = relative
        self.quantizer = quantizer
        initial = quantizer.scale.detach().clone()
        self.register_buffer("initial", initial)
        self.register_buffer("unit", initial.abs().mean())
        self.offset = nn.Parameter(torch.zeros_like(initial))
        self.drop_prob = drop_prob
        self.generator = generator

    @property
    def scale(self) -> torch.Tensor:
        """The current step, ``Δ₀ ⊙ (1 + p/m)`` or with ``relative`` ``Δ₀ ⊙ e^p`` (differentiable in ``p``)."""
        if self.relative:
            return self.initial * torch.exp(self.offset)
        return self.initial * (1 + self.offset / self.unit).clamp_min(self.MIN_RATIO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        keep_float = None
        if self.training and self.drop_prob > 0:
            # drawn on the CPU generator (the same seed gives the same masks on every device), moved as bools
            keep_float = (torch.rand(x.shape, generator=self.generator) < self.drop_prob).to(x.device)
        return _LearnedStepQuantize.apply(x, q.broadcast(self.scale, x), q.broadcast(q.zero_point, x), q.q_min,
                                          q.q_max, keep_float)

    def commit(self, point: nn.Module) -> None:
        """Install the learned step in the wrapped quantizer."""
        self.quantizer.set_params({"scale": self.scale.detach()})


class AdaRoundWeight(nn.Module):
    """Learned rounding of one layer's weight (per-row uniform quantizer, Δ and z fixed)."""

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.quantizer = quantizer
        weight = weight.detach()
        self.register_buffer("step", quantizer.broadcast(quantizer.scale, weight).detach().clone())
        self.register_buffer("zero_point", quantizer.broadcast(quantizer.zero_point, weight).detach().clone())
        self.register_buffer("floor", torch.floor(weight / self.step))
        rest = (weight / self.step - self.floor).clamp(1e-4, 1 - 1e-4)
        # σ(α)(ζ − γ) + γ = rest  ⇔  α = −log((ζ − γ)/(rest − γ) − 1)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def rounding(self) -> torch.Tensor:
        return (self.alpha >= 0).to(self.alpha.dtype) if self.hard else self.soft_rounding()

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        codes = torch.clamp(self.floor + self.rounding() + self.zero_point, q.q_min, q.q_max)
        return (codes - self.zero_point) * self.step

    def regularizer(self, beta: float) -> torch.Tensor:
        """``Σ 1 − |2h − 1|^β``: 0 when every h is 0 or 1."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def commit(self, point: nn.Module) -> None:
        """Harden the rounding and write the on-grid weight into ``point`` (the layer)."""
        self.hard = True
        point.weight.data.copy_(self.forward(point.weight))
