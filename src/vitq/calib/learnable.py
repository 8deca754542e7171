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
  step by the same fraction instead of the same amount, which would make a tiny step negative.
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


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """⌊x⌉ with the gradient of the identity."""
    return x + (torch.round(x) - x).detach()


class StraightThrough(nn.Module):
    """A fixed quantizer with a straight-through gradient."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            quantized = self.quantizer(x)
        return x + (quantized - x).detach()

    def commit(self, point: nn.Module) -> None:
        """Nothing was learned."""


class LearnedStep(nn.Module):
    """A uniform activation quantizer with a learned step (and QDrop while training)."""

    #: the smallest fraction of its initial value a step may shrink to (keeps it positive)
    MIN_RATIO = 1e-3

    def __init__(self, quantizer: UniformQuantizer, drop_prob: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.quantizer = quantizer
        initial = quantizer.scale.detach().clone()
        self.register_buffer("initial", initial)
        self.register_buffer("unit", initial.abs().mean())
        self.offset = nn.Parameter(torch.zeros_like(initial))
        self.drop_prob = drop_prob
        self.generator = generator

    @property
    def scale(self) -> torch.Tensor:
        """The current step ``Δ₀ ⊙ (1 + p/m)`` (differentiable in the offset ``p``)."""
        return self.initial * (1 + self.offset / self.unit).clamp_min(self.MIN_RATIO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        scale, zero_point = q.broadcast(self.scale, x), q.broadcast(q.zero_point, x)
        x_hat = (torch.clamp(round_ste(x / scale) + zero_point, q.q_min, q.q_max) - zero_point) * scale
        if self.training and self.drop_prob > 0:
            # drawn on the CPU generator (the same seed gives the same masks on every device), moved as bools
            keep_float = (torch.rand(x.shape, generator=self.generator) < self.drop_prob).to(x.device)
            x_hat = torch.where(keep_float, x, x_hat)
        return x_hat

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
