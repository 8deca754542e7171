"""What block reconstruction (:mod:`vitq.calib.recon`) minimises per stage: ``ReconConfig.loss`` picks one of these
(docs/recon_losses.md: our reading of the papers, and the cost).

Notation: ``ŷ`` the quantized stage's output on a mini-batch of calibration images, ``y`` the float stage's output
(the target), ``n`` an image, ``t`` a token (or pixel), ``c`` a channel; ``z(u)`` the model's output (class logits)
when the stage outputs ``u`` and the later stages run in float (the *float tail*), so ``z_f = z(y)`` is the float
model's; ``KL_T(z_f ‖ z) = Σ_k p_k log(p_k / q_k)`` with ``p = softmax(z_f/T)``, ``q = softmax(z/T)``.

- ``mse``: ``L = mean_{n,t} Σ_c (ŷ − y)²`` (BRECQ/QDrop's reconstruction error; the default).
- ``fisher``: ``L = mean_{n,t} Σ_c w ⊙ (ŷ − y)²``, ``w = g²`` per image and element, ``g = ∂KL_1(z_f ‖ z(u))/∂u`` at
  ``u = ŷ₀``, the stage's output in the model as it is before this stage is reconstructed (quantized up to and
  including the stage, float after it): BRECQ's diagonal Fisher, labels-free (the float prediction is the label).
  At ``u = y`` the KL is at its minimum and ``g = 0``: the quantization error is what makes the gradient speak.
- ``aphq``: the same weighted error with one ``w`` for all images, ``w = |mean_n diag H_n|``,
  ``H_n = ∇²_u KL_T(z_f ‖ z(u))`` at the float output ``u = y`` (APHQ-ViT's average perturbation Hessian), estimated
  by central differences of the gradient along random ±1 directions (Hutchinson's estimator):
  ``v ⊙ (g(y + h·v) − g(y − h·v)) / 2h = v ⊙ Hv + O(h²)`` and ``E_v[v ⊙ Hv] = diag H``; ``h = aphq_eps · RMS(y)``.
- ``global``: ``L = mean_n KL_1(z_f ‖ z(ŷ)) + λ·mean_{n,t} Σ_c (ŷ − y)²`` (λ = ``global_local_weight``): the stage is
  fitted to what the float rest of the model makes of its output, its own error a regulariser.
- ``fima``: ``L = mean_n Δ_nᵀ F_n Δ_n / T``, ``Δ_n = ŷ_n − y_n`` flattened, ``T`` tokens per image, and FIMA-Q's
  diagonal plus low-rank (DPLR) Fisher ``F_n = D_n + U Uᵀ``: ``D_n = (1 − s)·g_n² / mean(g²)`` (the ``fisher``
  weights, ``g_n`` the same gradients at ``ŷ₀``) and ``U Uᵀ = s·M_k / mean diag M_k``, ``M_k`` the best rank-k
  approximation of the images' mean empirical Fisher ``M = mean_n g_n g_nᵀ`` (k = ``fima_rank``, s =
  ``fima_low_rank_share``). ``U`` is shared by the images and catches what the diagonal cannot: errors of several
  elements that move the prediction together (``Δᵀ g gᵀ Δ = (gᵀΔ)²``, with the signs of the products).

The ``fisher`` and ``aphq`` weights are scaled to mean 1: Adam's steps do not depend on the loss's scale, but the
rounding regulariser (``round_weight``) is added to it, and mean-1 weights keep the weighted error on the plain
error's scale (equal to it where the error is spread evenly). ``fima``'s ``F`` has a mean diagonal of 1 for the same
reason, which is the same statement for a full matrix: an error spread evenly and independently over the elements
(``E[ΔΔᵀ] = σ²·I``) gives ``E[Δᵀ F Δ] = σ²·tr F``, the plain error's ``σ²·d``. The ``global`` KL has a scale of
its own.

Interface: a :class:`StageLoss` subclass registered by name; :func:`prepare_loss` builds it for one stage (all the
per-stage precomputation: the float prediction, the Fisher or Hessian weights; the float tail is a
:class:`FloatTail`), then ``loss(ŷ, index)`` is the loss of the mini-batch ``index`` and ``loss.full()`` the loss
over all the calibration images.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from vitq.calib.runner import run_batched
from vitq.errors import VitqError
from vitq.models import Stage
from vitq.registry import Registry

if TYPE_CHECKING:
    from vitq.config import ReconConfig
    from vitq.quantized_model import QuantizedModel

#: a map from a stage's output to the model's output (class logits)
Tail = Callable[[torch.Tensor], torch.Tensor]
#: which calibration images a mini-batch holds
Index = torch.Tensor | slice


@dataclass(frozen=True)
class FloatTail:
    """The stages after the reconstructed one with their quantizers off: a stage output → the float model's output
    (the later stages are not reconstructed yet, so they still have their original weights)."""

    qmodel: QuantizedModel
    stages: tuple[Stage, ...]

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        with self.qmodel.quantization_disabled(self.stages):
            for stage in self.stages:
                y = stage.run(y)
        return y


@dataclass(frozen=True)
class StageProblem:
    """One stage to reconstruct, as a loss sees it: its quantized input ``x`` and float output ``target`` on all the
    calibration images, the ``tail`` behind it, and how many images go through at a time."""

    stage: Stage
    x: torch.Tensor
    target: torch.Tensor
    tail: Tail
    batch_size: int

    def outputs(self) -> torch.Tensor:
        """The stage's output on every calibration image as the stage stands (``batch_size`` images at a time)."""
        with torch.no_grad():
            return run_batched(self.stage.run, self.x, self.batch_size)


def channel_dim(output: torch.Tensor) -> int:
    """Where a stage output's channels are: the last dim of tokens, dim 1 of a conv's NCHW output."""
    return 1 if output.dim() == 4 else -1


def squared_error(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_{n,t} Σ_c w ⊙ (ŷ − y)²`` (``w = 1`` without ``weight``; channels: :func:`channel_dim`)."""
    error = (output - target).square()
    if weight is not None:
        error = error * weight
    return error.sum(channel_dim(output)).mean()


def prediction_kl(float_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL_T(z_f ‖ z)`` per image: ``Σ_k p_k (log p_k − log q_k)``, ``p = softmax(z_f/T)``, ``q = softmax(z/T)``."""
    return F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(float_logits / temperature, -1),
                    reduction="none", log_target=True).sum(-1)


def prediction_gradient(tail: Tail, y: torch.Tensor, float_logits: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """``∂/∂y Σ_n KL_T(z_f,n ‖ z(y_n))`` on one batch: images do not interact, so row ``n`` is the gradient of image
    ``n``'s own KL."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        return torch.autograd.grad(prediction_kl(float_logits, tail(y), temperature).sum(), y)[0]


def prediction_gradients(outputs: torch.Tensor, tail: Tail, float_logits: torch.Tensor,
                         batch_size: int) -> torch.Tensor:
    """``g`` per image and element, ``g = ∂KL_1(z_f ‖ z(y))/∂y`` at ``y = outputs`` (one backward pass of the tail
    per batch of ``batch_size`` images)."""
    return torch.cat([prediction_gradient(tail, y, z)
                      for y, z in zip(outputs.split(batch_size), float_logits.split(batch_size), strict=True)])


def fisher_diagonal(outputs: torch.Tensor, tail: Tail, float_logits: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``g²`` per image and element (:func:`prediction_gradients`): the diagonal of image ``n``'s empirical Fisher
    ``g_n g_nᵀ``."""
    return prediction_gradients(outputs, tail, float_logits, batch_size).square()


def dplr_fisher(gradients: torch.Tensor, rank: int, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``D`` (the shape of ``gradients``) and ``U`` (``[d, ≤ rank]``, ``d`` the elements of one image) of the DPLR
    Fisher ``F_n = D_n + U Uᵀ`` from the per-image gradients ``g_n`` (the rows of ``G``, ``[N, d]`` flattened)::

        D_n = (1 − s)·g_n² / mean(g²)          U Uᵀ = s·M_k / mean diag M_k,      M = mean_n g_n g_nᵀ = GᵀG / N

    ``M_k`` keeps the ``rank`` largest eigenvalues of ``M`` (all of it when ``rank ≥ N``). ``M`` (``d × d``) is not
    formed: an eigenvector ``w`` of the Gram matrix ``G Gᵀ`` (``N × N``) gives ``GᵀG·Gᵀw = λ·Gᵀw``, so the columns
    ``Gᵀw`` of the top ``rank`` ones factor ``N·M_k``. ``F``'s mean diagonal is 1, ``1 − s`` of it in ``D`` (the
    scale: module docstring). Without a low-rank part (``rank`` or ``s`` 0, or all gradients 0) ``D`` takes the
    whole trace: the ``fisher`` weights, and ``U`` has no columns."""
    flat = gradients.flatten(1)
    _, eigenvectors = torch.linalg.eigh((flat @ flat.T).double())  # ascending eigenvalues
    factor = flat.T @ eigenvectors.flip(1)[:, :rank].to(flat)
    trace = float(factor.square().sum())  # N·d·mean diag M_k
    if share == 0 or trace == 0:
        return unit_mean(gradients.square()), factor[:, :0]
    return unit_mean(gradients.square()) * (1 - share), factor * math.sqrt(share * len(factor) / trace)


def perturbation_hessian_diagonal(outputs: torch.Tensor, tail: Tail, float_logits: torch.Tensor, *, eps: float,
                                  temperature: float, probes: int, batch_size: int,
                                  generator: torch.Generator) -> torch.Tensor:
    """An estimate of ``mean_n diag H_n``, ``H_n = ∇²_y KL_T(z_f,n ‖ z(y))`` at ``y = outputs[n]``, shape ``[1, ...]``.

    Per image and probe, ``v`` uniform in ``{±1}^d`` (drawn from ``generator``) and ``h = eps · RMS(outputs)``::

        v ⊙ (g(y + h·v) − g(y − h·v)) / 2h  =  v ⊙ H v + O(h²),      E_v[v ⊙ H v] = diag H  (E[v_i v_j] = δ_ij)

    averaged over the images and ``probes`` probes each (two backward passes of the tail per probe and batch)."""
    rms = float(outputs.square().mean().sqrt())
    h = eps * (rms if rms > 0 else 1.0)  # an all-zero output has no scale: eps itself
    total = torch.zeros_like(outputs[:1])
    for y, z in zip(outputs.split(batch_size), float_logits.split(batch_size), strict=True):
        for _ in range(probes):
            # drawn on the CPU generator: the same seed gives the same directions on every device
            v = torch.randint(2, y.shape, generator=generator, dtype=torch.int8).to(y) * 2 - 1
            up, down = (prediction_gradient(tail, y + sign * h * v, z, temperature) for sign in (1, -1))
            total += (v * (up - down)).sum(0, keepdim=True) / (2 * h)
    return total / (len(outputs) * probes)


def unit_mean(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` divided by its mean (see the module docstring); all zeros (the stage's output cannot move the
    prediction) give uniform weights, i.e. ``mse``."""
    mean = weight.mean()
    return weight / mean if mean > 0 else torch.ones_like(weight)


class StageLoss(ABC):
    """A stage's reconstruction loss, prepared for one :class:`StageProblem`."""

    #: the ``ReconConfig.loss`` value (set when registered)
    name: ClassVar[str] = ""

    def __init__(self, problem: StageProblem) -> None:
        self.problem = problem

    @classmethod
    @abstractmethod
    def prepare(cls, problem: StageProblem, settings: ReconConfig, generator: torch.Generator) -> StageLoss:
        """Do the per-stage precomputation (the quantized model as calibrated, before anything of the stage is
        learned); random draws come from ``generator``."""

    @abstractmethod
    def __call__(self, output: torch.Tensor, index: Index) -> torch.Tensor:
        """The loss of the stage's ``output`` on the calibration images ``index``."""

    def full(self) -> float:
        """The loss over all the calibration images (the stage run ``batch_size`` images at a time)."""
        outputs = self.problem.outputs()
        with torch.no_grad():
            return float(self(outputs, slice(None)))

    @classmethod
    def float_logits(cls, problem: StageProblem) -> torch.Tensor:
        """``z_f`` on every calibration image: the float tail run on the float stage output."""
        with torch.no_grad():
            logits = run_batched(problem.tail, problem.target, problem.batch_size)
        if logits.dim() != 2:
            raise VitqError(f"reconstruction loss {cls.name!r} needs a model that outputs class logits [images, "
                            f"classes]; this one outputs {tuple(logits.shape)}")
        return logits


LOSSES: Registry[type[StageLoss]] = Registry("reconstruction loss", attribute="name")
loss_names = LOSSES.names


def prepare_loss(settings: ReconConfig, problem: StageProblem, generator: torch.Generator) -> StageLoss:
    """The loss ``settings.loss``, prepared for ``problem``."""
    return LOSSES.get(settings.loss).prepare(problem, settings, generator)


@LOSSES.register("mse")
class SquaredError(StageLoss):
    """``mean_{n,t} Σ_c w ⊙ (ŷ − y)²``; ``w = 1`` here, one weight per image and element (or one ``[1, ...]`` weight
    expanded over the images) in the subclasses."""

    def __init__(self, problem: StageProblem, weight: torch.Tensor | None = None) -> None:
        super().__init__(problem)
        self.weight = weight

    @classmethod
    def prepare(cls, problem: StageProblem, settings: ReconConfig, generator: torch.Generator) -> StageLoss:
        return cls(problem)

    def __call__(self, output: torch.Tensor, index: Index) -> torch.Tensor:
        return squared_error(output, self.problem.target[index], None if self.weight is None else self.weight[index])


@LOSSES.register("fisher")
class FisherError(SquaredError):
    """BRECQ's diagonal Fisher weights ``g²`` at the stage's quantized output, scaled to mean 1."""

    @classmethod
    def prepare(cls, problem: StageProblem, settings: ReconConfig, generator: torch.Generator) -> StageLoss:
        return cls(problem, unit_mean(fisher_diagonal(problem.outputs(), problem.tail, cls.float_logits(problem),
                                                      problem.batch_size)))


@LOSSES.register("aphq")
class PerturbationHessianError(SquaredError):
    """APHQ-ViT's average perturbation Hessian: ``|mean_n diag H_n|`` at the float output, scaled to mean 1, shared
    by all images (the estimate can dip below 0 by noise only: at the float output the KL is at its minimum and its
    Hessian positive semi-definite)."""

    @classmethod
    def prepare(cls, problem: StageProblem, settings: ReconConfig, generator: torch.Generator) -> StageLoss:
        diagonal = perturbation_hessian_diagonal(
            problem.target, problem.tail, cls.float_logits(problem), eps=settings.aphq_eps,
            temperature=settings.aphq_temperature, probes=settings.aphq_probes, batch_size=problem.batch_size,
            generator=generator)
        return cls(problem, unit_mean(diagonal.abs()).expand_as(problem.target))


@LOSSES.register("global")
class GlobalPrediction(StageLoss):
    """``mean_n KL_1(z_f ‖ z(ŷ)) + λ·mean_{n,t} Σ_c (ŷ − y)²``: every step runs the mini-batch through the float
    tail (forward and backward)."""

    def __init__(self, problem: StageProblem, float_logits: torch.Tensor, local_weight: float) -> None:
        super().__init__(problem)
        self.float_logits = float_logits
        self.local_weight = local_weight

    @classmethod
    def prepare(cls, problem: StageProblem, settings: ReconConfig, generator: torch.Generator) -> StageLoss:
        return cls(problem, cls.float_logits(problem), settings.global_local_weight)

    def __call__(self, output: torch.Tensor, index: Index) -> torch.Tensor:
        kl = prediction_kl(self.float_logits[index], self.problem.tail(output)).mean()
        return kl + self.local_weight * squared_error(output, self.problem.target[index])

    def full(self) -> float:
        """Over the images ``batch_size`` at a time (the tail too), each batch weighted by its size (every term is
        a mean over images)."""
        p = self.problem
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(p.x), p.batch_size):
                index = slice(start, start + p.batch_size)
                total += float(self(p.stage.run(p.x[index]), index)) * len(p.x[index])
        return total / len(p.x)


@LOSSES.register("fima")
class DplrFisherError(SquaredError):
    """FIMA-Q's diagonal plus low-rank Fisher (:func:`dplr_fisher`): ``mean_n Δ_nᵀ (D_n + U Uᵀ) Δ_n / T``, the
    diagonal part the weighted squared error and the low-rank part ``‖Uᵀ Δ_n‖² / T`` (one ``[B, d] × [d, k]``
    product per step). With ``fima_rank = 0`` it is the ``fisher`` loss."""

    def __init__(self, problem: StageProblem, weight: torch.Tensor, factor: torch.Tensor) -> None:
        super().__init__(problem, weight)
        self.factor = factor

    @classmethod
    def prepare(cls, problem: StageProblem, settings: ReconConfig, generator: torch.Generator) -> StageLoss:
        gradients = prediction_gradients(problem.outputs(), problem.tail, cls.float_logits(problem),
                                         problem.batch_size)
        return cls(problem, *dplr_fisher(gradients, settings.fima_rank, settings.fima_low_rank_share))

    def __call__(self, output: torch.Tensor, index: Index) -> torch.Tensor:
        error = (output - self.problem.target[index]).flatten(1)
        tokens = error.shape[1] // output.shape[channel_dim(output)]
        return super().__call__(output, index) + (error @ self.factor).square().sum(-1).mean() / tokens
