"""APHQ-ViT (``aphq-vit``): the GELU → ReLU restructuring and its reload, the MLP reconstruction's pieces against
direct computations, and the method end to end on a small random ViT."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import random_images, random_test_vit
from torch import nn

import vitq
from vitq.calib.losses import perturbation_hessian_diagonal, squared_error
from vitq.config import ReconConfig
from vitq.errors import VitqError
from vitq.methods import method_class
from vitq.methods.aphq_vit.mlp_reconstruction import (
    CLIPPED_WEIGHT,
    _mlp_output_hessian,
    fit_mlp,
    positive_quantile,
    swap_gelu_for_relu,
)

MR = {"mlp_reconstruction": True, "mr_iterations": 5, "mr_batch_size": 2}


def test_swap_makes_every_gelu_mlp_a_relu_and_refuses_a_model_without_one():
    model = random_test_vit()
    paths = swap_gelu_for_relu(model)
    assert paths == [f"blocks.{i}.mlp" for i in range(len(model.blocks))]
    assert all(isinstance(block.mlp.act, nn.ReLU) for block in model.blocks)
    with pytest.raises(VitqError, match="needs MLPs with a GELU"):
        swap_gelu_for_relu(model)


def test_positive_quantile_is_the_quantile_of_the_positive_values():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert positive_quantile(values, 0.98) == pytest.approx(float(torch.quantile(values[values > 0], 0.98)))
    assert positive_quantile(-values.abs(), 0.5) == 0.0
    sampled = positive_quantile(values, 0.5, limit=400, generator=torch.Generator().manual_seed(1))
    assert 0.5 < sampled < 0.85  # the median of |N(0, 1)| is 0.674


def test_fit_mlp_minimises_the_stated_loss():
    torch.manual_seed(0)
    teacher = timm.layers.Mlp(8, 16, act_layer=nn.GELU)
    student = copy.deepcopy(teacher)
    student.act = nn.ReLU()
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = teacher(x)
    weight = torch.rand(1, 5, 8, generator=torch.Generator().manual_seed(2)) + 0.5
    bound = 0.3
    with torch.no_grad():  # the loss of the module notes, written out
        hidden = torch.relu(student.fc1(x))
        direct = (((student.fc2(hidden) - y) ** 2 * weight).sum(-1).mean()
                  + CLIPPED_WEIGHT * ((student.fc2(hidden.clamp(max=bound)) - y) ** 2 * weight).sum(-1).mean())
    before, after = fit_mlp(student, x, y, weight, bound, iterations=200, batch_size=6, lr=1e-2,
                            generator=torch.Generator().manual_seed(3))
    assert before == pytest.approx(float(direct), rel=1e-6)
    assert after < 0.5 * before
    assert all(p.grad is None for p in student.parameters())


def test_mlp_output_hessian_is_the_block_output_hessian_of_a_plain_vit_block():
    """In a ViT block without LayerScale the MLP's output adds straight into the block's output, so the Hessian
    diagonal of the prediction KL is the same w.r.t. both: the hook-based tail must reproduce the stage tail's."""
    model = random_test_vit().double()
    teacher = vitq.prepare(model, vitq.QuantConfig(method="float"), inplace=True)
    stages = teacher.stages()
    index = next(i for i, stage in enumerate(stages) if stage.name == "blocks.4")
    x = random_images(3).double()
    with torch.no_grad():
        logits = teacher.model(x)
        for stage in stages[:index]:
            x = stage.run(x)
        block_out = stages[index].run(x)
        mlp = teacher.model.blocks[4].mlp
        captured = []
        hook = mlp.register_forward_hook(lambda m, a, out: captured.append(out))
        stages[index].run(x)
        hook.remove()

    def block_tail(u):
        for stage in stages[index + 1:]:
            u = stage.run(u)
        return u

    mlp_out = captured[0]
    ours = _mlp_output_hessian(teacher, stages, index, mlp, x, mlp_out, logits, temperature=20.0, eps=1e-4,
                               batch_size=3, generator=torch.Generator().manual_seed(0))
    # the same probes at the block's output (the step h scales with the RMS of what is perturbed)
    h_ratio = float(block_out.square().mean().sqrt() / mlp_out.square().mean().sqrt())
    reference = perturbation_hessian_diagonal(block_out, block_tail, logits, eps=1e-4 / h_ratio, temperature=20.0,
                                              probes=1, batch_size=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, reference.abs(), rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


def test_aphq_vit_reconstructs_with_the_aphq_loss_and_mr_reloads_with_relu_mlps(tmp_path):
    config = vitq.QuantConfig(method="aphq-vit", w_bits=4, a_bits=4, calib_size=4, options=MR,
                              reconstruct=ReconConfig(iterations=2, batch_size=2))
    method = method_class("aphq-vit")(config)
    assert method.reconstruction().loss == "aphq" and method.reconstruction().drop_prob == 0.5
    model = random_test_vit()
    images = random_images(4)
    qmodel = vitq.quantize(model, config, images, progress=False)
    assert isinstance(model.blocks[0].mlp.act, nn.GELU)  # the user's model is left as it was
    assert all(isinstance(block.mlp.act, nn.ReLU) for block in qmodel.model.blocks)
    fc2_input = qmodel.model.blocks[0].mlp.fc2.input_quantizer
    assert fc2_input.q_min == 0 and bool((fc2_input.zero_point == 0).all())
    with torch.no_grad():
        out = qmodel(images)
        with qmodel.quantization_disabled():
            refitted = qmodel(images)
        reference = model(images)
        relu_only = copy.deepcopy(model)
        swap_gelu_for_relu(relu_only)
        # the refit moves the ReLU network towards the GELU one
        assert squared_error(refitted, reference) < squared_error(relu_only(images), reference)
    assert torch.isfinite(out).all()
    loaded = vitq.load(vitq.save(qmodel, tmp_path / "aphq.safetensors"))
    assert all(isinstance(block.mlp.act, nn.ReLU) for block in loaded.model.blocks)
    with torch.no_grad():
        assert torch.equal(loaded(images), out)


def test_aphq_vit_without_mr_keeps_gelu_and_calibrating_mr_without_its_prepare_is_one_line():
    config = vitq.QuantConfig(method="aphq-vit", w_bits=8, a_bits=8, calib_size=2,
                              reconstruct=ReconConfig(iterations=1, batch_size=2))
    qmodel = vitq.quantize(random_test_vit(), config, random_images(2), progress=False)
    assert isinstance(qmodel.model.blocks[0].mlp.act, nn.GELU)
    mr = vitq.QuantConfig(method="aphq-vit", options=MR)
    skeleton = vitq.prepare(random_test_vit(), mr)
    with pytest.raises(VitqError, match="needs the model prepared by this method instance"):
        method_class("aphq-vit")(mr).calibrate(skeleton, random_images(2), progress=False)
