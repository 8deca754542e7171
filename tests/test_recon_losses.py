"""Tests of the reconstruction losses (vitq.calib.losses), each against a direct computation, and of the ``loss``
setting of the reconstruction engine (vitq.calib.recon, ReconConfig)."""

import copy
import json
import math
from typing import get_args

import pytest
import torch
from helpers import quantized_test_vit

from vitq.calib.losses import (
    DplrFisherError,
    FisherError,
    FloatTail,
    GlobalPrediction,
    PerturbationHessianError,
    SquaredError,
    StageProblem,
    fisher_diagonal,
    loss_names,
    perturbation_hessian_diagonal,
    unit_mean,
)
from vitq.calib.recon import full_loss, reconstruct_model, reconstruct_stage
from vitq.cli import _request, build_parser
from vitq.config import QuantConfig, ReconConfig, make
from vitq.errors import VitqError
from vitq.models import Stage

LOSSES = ["mse", "fisher", "aphq", "global", "fima"]


def _kl_by_hand(float_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Σ_k p_k (log p_k − log q_k) per row, p = softmax(z_f/T), q = softmax(z/T)."""
    p = torch.softmax(float_logits / temperature, -1)
    return (p * (torch.log(p) - torch.log_softmax(logits / temperature, -1))).sum(-1)


class TwoLayerNet:
    """``z = W2·tanh(y)``, ``y = W1·x``: the first layer is the stage (quantized: W1 rounded to 1/4), the tanh and
    second layer the tail."""

    def __init__(self, d_in: int = 5, d_hidden: int = 6, classes: int = 4, dtype=torch.float32) -> None:
        gen = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(d_hidden, d_in, generator=gen, dtype=dtype)
        self.w2 = torch.randn(classes, d_hidden, generator=gen, dtype=dtype) * 2
        self.w1_quantized = torch.round(self.w1 * 4) / 4

    def tail(self, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y) @ self.w2.T

    def problem(self, x: torch.Tensor, batch_size: int) -> StageProblem:
        stage = Stage("layer1", ("layer1",), lambda inputs: inputs @ self.w1_quantized.T)
        return StageProblem(stage, x, x @ self.w1.T, self.tail, batch_size)


def test_mse_is_the_squared_error_it_always_was():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 8, generator=gen)
    weight = torch.randn(8, 8, generator=gen)
    stage = Stage("s", ("s",), lambda inputs: inputs @ weight)
    target = torch.randn(6, 10, 8, generator=gen)
    loss = SquaredError(StageProblem(stage, x, target, tail=lambda y: y, batch_size=4))
    before = (x @ weight - target).square().sum(-1).mean()  # the engine's loss before losses.py (tokens: last dim)
    assert torch.equal(loss(x @ weight, slice(None)), before)
    assert loss.full() == full_loss(stage, x, target, 4) == float(before)
    index = torch.tensor([4, 1])
    assert torch.equal(loss(x[index] @ weight, index), (x[index] @ weight - target[index]).square().sum(-1).mean())
    images = torch.randn(3, 5, 4, 4, generator=gen)  # conv layout: channels are dim 1
    conv = SquaredError(StageProblem(stage, images, images.flip(0), tail=lambda y: y, batch_size=4))
    assert torch.equal(conv(images, slice(None)), (images - images.flip(0)).square().sum(1).mean())


def test_fisher_weights_are_the_squared_gradients_of_the_prediction_kl():
    net = TwoLayerNet()
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    outputs, float_logits = x @ net.w1_quantized.T, net.tail(x @ net.w1.T)
    expected = []
    for n in range(len(x)):  # one image at a time, plain autograd
        y = outputs[n].clone().requires_grad_(True)
        grad, = torch.autograd.grad(_kl_by_hand(float_logits[n], net.tail(y)), y)
        expected.append(grad.square())
    expected = torch.stack(expected)
    assert expected.abs().min() > 0
    assert torch.allclose(fisher_diagonal(outputs, net.tail, float_logits, batch_size=2), expected, rtol=1e-5,
                          atol=0)
    loss = FisherError.prepare(net.problem(x, batch_size=2), ReconConfig(loss="fisher"), torch.Generator())
    assert torch.allclose(loss.weight, expected / expected.mean(), rtol=1e-5)
    error = (outputs - x @ net.w1.T).square()
    assert loss.full() == pytest.approx(float((loss.weight * error).sum(-1).mean()), rel=1e-6)


def _mean_hessian_diagonal(net: TwoLayerNet, outputs: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over images of diag ∇²_y KL_T(z_f ‖ z(y)) at y = the image's float output, by autograd's hessian."""
    diagonals = []
    for y in outputs:
        float_logits = net.tail(y)
        hessian = torch.autograd.functional.hessian(lambda v, z=float_logits: _kl_by_hand(z, net.tail(v), temperature),
                                                    y)
        diagonals.append(torch.diagonal(hessian))
    return torch.stack(diagonals).mean(0, keepdim=True)


def test_aphq_weights_estimate_the_hessian_diagonal_of_the_prediction_kl():
    gen = torch.Generator().manual_seed(2)
    # one output element per image: every ±1 probe v gives v·H·v = H, so only the finite difference errs (O(h²))
    net = TwoLayerNet(d_in=3, d_hidden=1, dtype=torch.float64)
    outputs = torch.randn(7, 3, generator=gen, dtype=torch.float64) @ net.w1.T
    estimate = perturbation_hessian_diagonal(outputs, net.tail, net.tail(outputs), eps=1e-4, temperature=2.0,
                                             probes=2, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(estimate, _mean_hessian_diagonal(net, outputs, 2.0), rtol=1e-6, atol=0)

    # six elements: the off-diagonal terms v_i·H_ij·v_j average out over 4 images x 512 copies x 4 probes; their
    # standard deviation per element, sqrt(mean_n Σ_{j≠i} H_ij²) / sqrt(8192), is at most 0.8 % of the largest
    # diagonal element here, so the 5 % bound is about 6 standard deviations
    net = TwoLayerNet(dtype=torch.float64)
    images = torch.randn(4, 5, generator=gen, dtype=torch.float64) @ net.w1.T
    outputs = images.repeat(512, 1)
    reference = _mean_hessian_diagonal(net, images, 2.0)
    estimate = perturbation_hessian_diagonal(outputs, net.tail, net.tail(outputs), eps=1e-3, temperature=2.0,
                                             probes=4, batch_size=1024, generator=torch.Generator().manual_seed(0))
    assert (estimate - reference).abs().max() < 0.05 * reference.abs().max()
    problem = StageProblem(Stage("s", ("s",), lambda y: y), outputs, outputs, net.tail, 1024)
    settings = ReconConfig(loss="aphq", aphq_eps=1e-3, aphq_temperature=2.0, aphq_probes=4)
    loss = PerturbationHessianError.prepare(problem, settings, torch.Generator().manual_seed(0))
    assert torch.equal(loss.weight, unit_mean(estimate.abs()).expand_as(outputs))


def _token_problem(net: TwoLayerNet, x: torch.Tensor, batch_size: int) -> StageProblem:
    """``net``'s first layer on every token of ``x`` ``[images, tokens, d_in]``; the tail reads the mean token."""
    stage = Stage("layer1", ("layer1",), lambda inputs: inputs @ net.w1_quantized.T)
    return StageProblem(stage, x, x @ net.w1.T, lambda y: net.tail(y.mean(-2)), batch_size)


@pytest.mark.parametrize("rank", [2, 5, 8])
def test_fima_loss_is_the_error_under_the_diagonal_plus_low_rank_fisher(rank):
    net = TwoLayerNet(dtype=torch.float64)
    x = torch.randn(5, 3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # 5 images, 3 tokens
    problem = _token_problem(net, x, batch_size=2)
    outputs = x @ net.w1_quantized.T
    gradients = []
    for n in range(len(x)):  # one image at a time, plain autograd
        y = outputs[n].clone().requires_grad_(True)
        grad, = torch.autograd.grad(_kl_by_hand(problem.tail(problem.target[n]), problem.tail(y)), y)
        gradients.append(grad.flatten())
    g = torch.stack(gradients)  # [5 images, 18 elements]
    # the images' mean empirical Fisher, its `rank` largest eigenvalues (all five nonzero ones from rank 5 on)
    eigenvalues, eigenvectors = torch.linalg.eigh(g.T @ g / len(g))
    top = eigenvectors[:, -rank:]
    low_rank = top @ torch.diag(eigenvalues[-rank:]) @ top.T
    share = 0.3
    fisher = [(1 - share) * torch.diag(g_n.square()) / g.square().mean() + share * low_rank / low_rank.diagonal().mean()
              for g_n in g]  # F_n = D_n + U Uᵀ, 18 x 18
    assert torch.stack(fisher).diagonal(dim1=1, dim2=2).mean() == pytest.approx(1.0, rel=1e-12)
    errors = (outputs - problem.target).flatten(1)
    expected = torch.stack([e @ f @ e for e, f in zip(errors, fisher, strict=True)]) / 3  # per image, / 3 tokens

    settings = ReconConfig(loss="fima", fima_rank=rank, fima_low_rank_share=share)
    loss = DplrFisherError.prepare(problem, settings, torch.Generator())
    assert loss.factor.shape == (18, min(rank, 5))
    assert torch.allclose(loss.factor @ loss.factor.T, share * low_rank / low_rank.diagonal().mean(), rtol=0,
                          atol=1e-10)
    assert loss.full() == pytest.approx(float(expected.mean()), rel=1e-10)
    index = torch.tensor([4, 1])
    assert float(loss(outputs[index], index)) == pytest.approx(float(expected[index].mean()), rel=1e-10)


def test_fima_loss_without_a_low_rank_part_is_the_fisher_loss():
    net = TwoLayerNet()
    x = torch.randn(5, 3, 5, generator=torch.Generator().manual_seed(4))
    problem = _token_problem(net, x, batch_size=2)
    fisher = FisherError.prepare(problem, ReconConfig(loss="fisher"), torch.Generator())
    outputs = problem.outputs()
    for settings in (ReconConfig(loss="fima", fima_rank=0), ReconConfig(loss="fima", fima_low_rank_share=0.0)):
        loss = DplrFisherError.prepare(problem, settings, torch.Generator())
        assert loss.factor.shape == (18, 0) and torch.equal(loss.weight, fisher.weight)
        assert torch.equal(loss(outputs, slice(None)), fisher(outputs, slice(None)))
    # a stage whose output cannot move the prediction: no gradient, no low-rank part, uniform weights (mse)
    still = StageProblem(problem.stage, x, problem.target, lambda y: y.sum((1, 2))[:, None] * 0 + net.w2[:, 0], 2)
    loss = DplrFisherError.prepare(still, ReconConfig(loss="fima"), torch.Generator())
    assert loss.factor.shape == (18, 0) and torch.equal(loss.weight, torch.ones_like(problem.target))


def test_losses_that_need_the_prediction_refuse_a_model_without_class_logits():
    x = torch.randn(2, 3, 4)
    problem = StageProblem(Stage("s", ("s",), lambda y: y), x, x, lambda y: y, 2)
    with pytest.raises(VitqError, match="needs a model that outputs class logits"):
        FisherError.prepare(problem, ReconConfig(loss="fisher"), torch.Generator())


@pytest.fixture(scope="module")
def quantized():
    """The quantized test ViT, the calibration images, and the stage ``blocks.4`` (quantized input, float output)."""
    _, images, qmodel = quantized_test_vit("repq-vit", 4, 4)
    stages = qmodel.stages()
    index = [s.name for s in stages].index("blocks.4")
    with torch.no_grad():
        x = images
        for stage in stages[:index]:
            x = stage.run(x)
        with qmodel.quantization_disabled():
            x_float = images
            for stage in stages[:index + 1]:
                x_float = stage.run(x_float)
    return qmodel, images, index, x, x_float


def test_global_loss_runs_the_quantized_stage_then_the_float_tail(quantized):
    qmodel, _, index, x, target = quantized
    stages = qmodel.stages()
    settings = ReconConfig(loss="global", global_local_weight=0.5)
    problem = StageProblem(stages[index], x, target, FloatTail(qmodel, tuple(stages[index + 1:])), 3)
    loss = GlobalPrediction.prepare(problem, settings, torch.Generator())
    with torch.no_grad():
        output = stages[index].run(x)  # quantized stage
        with qmodel.quantization_disabled():  # the rest by hand: blocks.5 and the head, float
            logits = qmodel.model.forward_head(qmodel.model.norm(qmodel.model.blocks[5](output)))
            float_logits = qmodel.model.forward_head(qmodel.model.norm(qmodel.model.blocks[5](target)))
        expected = _kl_by_hand(float_logits, logits).mean() + 0.5 * (output - target).square().sum(-1).mean()
        assert float(loss(output, slice(None))) == pytest.approx(float(expected), rel=1e-5)
    assert loss.full() == pytest.approx(float(expected), rel=1e-5)  # in batches of 3 and 1 images
    assert all(q.enabled for q in qmodel.quantizers().values())  # the tail's quantizers are back on


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_reconstructs_a_stage_and_the_whole_model(quantized, loss):
    qmodel, images, index, x, target = quantized
    qmodel = copy.deepcopy(qmodel)
    stages = qmodel.stages()
    settings = make(ReconConfig, iterations=20, batch_size=2, loss=loss)
    record = reconstruct_stage(qmodel, stages[index], x, target, settings, tail=stages[index + 1:], progress=False)
    assert record.loss_after <= record.loss_before
    block = qmodel.model.blocks[4]
    for name in ("attn.qkv", "mlp.fc2"):
        layer = block.get_submodule(name)
        assert torch.equal(layer.weight_quantizer(layer.weight.detach()), layer.weight.detach()), name
    records = reconstruct_model(qmodel, images[:3], make(ReconConfig, iterations=2, batch_size=2, loss=loss),
                                progress=False)
    assert [r.stage for r in records] == [s.name for s in stages]
    assert all(math.isfinite(r.loss_before) and math.isfinite(r.loss_after) for r in records)


def test_loss_setting_round_trips_and_is_checked(tmp_path):
    assert set(loss_names()) == set(get_args(ReconConfig.model_fields["loss"].annotation)) == set(LOSSES)
    saved_before = ReconConfig(iterations=7).model_dump(mode="json")  # what a config saved before the setting holds
    assert "loss" not in saved_before and ReconConfig.model_validate(saved_before).loss == "mse"
    config = QuantConfig(reconstruct=ReconConfig(loss="aphq", aphq_eps=0.01, aphq_temperature=4.0))
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    loaded = QuantConfig.model_validate(json.loads(path.read_text()))
    assert loaded == config and loaded.reconstruct.aphq_eps == 0.01 and loaded.reconstruct.aphq_probes == 1
    args = build_parser().parse_args(["quantize", "--model", "test_vit", "--output", str(tmp_path / "out"),
                                      "--recon", "loss=fisher", "--recon", "iterations=5"])
    assert _request(args).build().reconstruct == ReconConfig(loss="fisher", iterations=5)
    with pytest.raises(VitqError, match="invalid loss: unit='layer'"):
        make(ReconConfig, unit="layer", loss="global")
    with pytest.raises(VitqError, match="invalid aphq_eps: applies to loss='aphq' only"):
        make(ReconConfig, aphq_eps=0.1)
    with pytest.raises(VitqError, match="invalid global_local_weight: applies to loss='global' only"):
        make(ReconConfig, loss="fisher", global_local_weight=1.0)
    with pytest.raises(VitqError, match="invalid fima_rank: applies to loss='fima' only"):
        make(ReconConfig, loss="fisher", fima_rank=2)
    with pytest.raises(VitqError, match="invalid fima_low_rank_share: applies to loss='fima' only"):
        make(ReconConfig, fima_low_rank_share=0.2)
    with pytest.raises(VitqError, match="invalid fima_low_rank_share"):
        make(ReconConfig, loss="fima", fima_low_rank_share=1.5)
    assert set(ReconConfig(loss="fima").model_dump()) == {*saved_before, "loss"}  # the fima_* defaults left out
    args = build_parser().parse_args(["quantize", "--model", "test_vit", "--output", str(tmp_path / "out"),
                                      "--recon", "loss=fima", "--recon", "fima_rank=2"])
    assert _request(args).build().reconstruct == ReconConfig(loss="fima", fima_rank=2)
    with pytest.raises(VitqError, match="invalid loss"):
        make(ReconConfig, loss="hessian")
