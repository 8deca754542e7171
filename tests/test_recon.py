"""Tests of the block-reconstruction engine (vitq.calib.recon) and its learnable stand-ins (vitq.calib.learnable)."""

import copy
import math

import pytest
import torch
from helpers import quantized_test_vit

import vitq.calib.recon as recon
from vitq.calib.learnable import AdaRoundWeight, LearnedStep, StraightThrough
from vitq.calib.recon import reconstruct_model, reconstruct_stage
from vitq.config import ReconConfig, make
from vitq.errors import VitqError
from vitq.models import Stage
from vitq.quantizers import UniformQuantizer, build_quantizer

FAST = ReconConfig(iterations=30, batch_size=2)
#: the resume test runs three reconstructions of the whole test model
TINY = ReconConfig(iterations=3, batch_size=2)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """⌊x⌉ with the gradient of the identity: the reference the learned step's written-out gradients must match."""
    return x + (torch.round(x) - x).detach()


def _uniform(bits=4, **spec):
    return build_quantizer({"kind": "uniform", "bits": bits, **spec})


def test_learned_step_has_lsq_gradients():
    quantizer = _uniform(4)
    quantizer.set_params({"scale": torch.tensor([0.1]), "zero_point": torch.tensor([3.0])})
    step = LearnedStep(quantizer)
    x = torch.tensor([0.123, -0.2, -5.0, 5.0])  # inside, inside, below and above the range
    x_hat = step(x)
    assert torch.allclose(x_hat, quantizer(x))
    # one step: Δ = Δ₀ + p, so the gradient in the offset p is LSQ's gradient in Δ
    grads = [torch.autograd.grad(x_hat[i], step.offset, retain_graph=True)[0].item() for i in range(4)]
    inside = [round(v / 0.1) - v / 0.1 for v in (0.123, -0.2)]
    assert grads == pytest.approx([*inside, 0 - 3.0, 15 - 3.0], abs=1e-4)
    step.offset.data.fill_(0.1)
    step.commit(None)
    assert float(quantizer.scale) == pytest.approx(0.2)


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_learned_step_gradients_equal_autograd_on_the_composed_expression(granularity, drop_prob, relative):
    # the reference: the expression written with round_ste, clamp and torch.where, differentiated by autograd
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 6, generator=generator) * torch.linspace(0.5, 3, 6)
    quantizer = _uniform(3, **({"granularity": "channel", "axis": -1} if granularity == "channel" else {}))
    quantizer.calibrate(x * 0.6)  # a range narrower than x: some elements are clamped
    step = LearnedStep(quantizer, drop_prob=drop_prob, generator=torch.Generator().manual_seed(1),
                       relative=relative).train()
    step.offset.data.uniform_(-0.01, 0.01, generator=generator)
    upstream = torch.randn(x.shape, generator=generator)
    ours_x = x.clone().requires_grad_(True)
    (step(ours_x) * upstream).sum().backward()
    ours = (ours_x.grad, step.offset.grad.clone())
    step.offset.grad = None
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < drop_prob
    ref_x = x.clone().requires_grad_(True)
    s, z = quantizer.broadcast(step.scale, x), quantizer.broadcast(quantizer.zero_point, x)
    x_hat = (torch.clamp(round_ste(ref_x / s) + z, quantizer.q_min, quantizer.q_max) - z) * s
    reference = torch.where(keep, ref_x, x_hat) if drop_prob else x_hat
    (reference * upstream).sum().backward()
    assert bool(keep.any()) == bool(drop_prob)
    torch.testing.assert_close(ours[0], ref_x.grad)
    torch.testing.assert_close(ours[1], step.offset.grad)
    assert torch.equal(ours_x.grad.ne(0), ref_x.grad.ne(0))  # the same elements pass the gradient
    step.eval()
    with torch.no_grad():
        assert torch.equal(step(x), x_hat)  # the same values as the composed expression


def _adam_steps(parameter: torch.Tensor, step_of, x: torch.Tensor, quantizer, n: int = 20) -> list[torch.Tensor]:
    """``n`` Adam steps (lr 4e-5) on ``‖Q(x) − x‖²`` with the step given by ``step_of(parameter)``."""
    optimizer, trace = torch.optim.Adam([parameter], lr=4e-5), []
    for _ in range(n):
        scale = step_of(parameter)
        s, z = quantizer.broadcast(scale, x), quantizer.broadcast(quantizer.zero_point, x)
        x_hat = (torch.clamp(round_ste(x / s) + z, quantizer.q_min, quantizer.q_max) - z) * s
        optimizer.zero_grad()
        (x_hat - x).square().sum().backward()
        optimizer.step()
        trace.append(step_of(parameter).detach().clone())
    return trace


def test_learned_per_tensor_step_follows_plain_lsq_and_per_channel_steps_move_by_fractions():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 1e-4])
    tensor = _uniform(4)
    tensor.calibrate(x)
    step = LearnedStep(tensor)
    ours = _adam_steps(step.offset, lambda _: step.scale, x, tensor)
    plain = _adam_steps(tensor.scale.detach().clone().requires_grad_(True), lambda s: s, x, tensor)
    torch.testing.assert_close(torch.stack(ours), torch.stack(plain))  # Δ₀ + p: LSQ on Δ itself
    channel = _uniform(4, granularity="channel", axis=-1)
    channel.calibrate(x)
    step = LearnedStep(channel)
    start = channel.scale.clone()
    trace = _adam_steps(step.offset, lambda _: step.scale, x, channel)
    ratio = trace[-1] / start
    assert float(start[1] / start[0]) < 1e-3  # steps four decades apart
    # Adam moves the offset by about lr per iteration: at most 20·lr/m of each step, the tiny one included
    assert bool((ratio > 0).all()) and float((ratio - 1).abs().max()) <= 20 * 4e-5 / float(start.mean()) * 1.01


def test_relative_steps_learn_the_same_fractions_whatever_their_size():
    # x and 100·x with 100 times the step: the loss scales by 10⁴, which Adam does not see, so Δ = Δ₀·e^p follows
    # the same ratios Δ/Δ₀ in both (LSQ's absolute offset would move the large step 100 times more slowly)
    x = torch.randn(256, generator=torch.Generator().manual_seed(0))
    traces = []
    for factor in (1.0, 100.0):
        quantizer = _uniform(3)
        quantizer.calibrate(x * factor)
        step = LearnedStep(quantizer, relative=True)
        start = quantizer.scale.clone()
        trace = _adam_steps(step.offset, lambda _, step=step: step.scale, x * factor, quantizer)
        traces.append(torch.stack(trace) / start)
    torch.testing.assert_close(traces[0], traces[1])
    assert float((traces[0][-1] - 1).abs()) > 20 * 4e-5 * 0.5  # it moved, by about lr per iteration
    assert float((traces[0] - 1).abs().max()) <= math.expm1(20 * 4e-5) * 1.01
    step.offset.data.fill_(math.log(2))
    step.commit(None)
    torch.testing.assert_close(quantizer.scale, 2 * start)


def test_qdrop_keeps_float_values_while_training_only():
    quantizer = _uniform(3)
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    quantizer.calibrate(x)
    step = LearnedStep(quantizer, drop_prob=0.5, generator=torch.Generator().manual_seed(1))
    kept = (step(x) == x).float().mean().item()
    assert 0.45 < kept < 0.55
    step.eval()
    assert torch.equal(step(x), quantizer(x))


def test_straight_through_passes_the_identity_gradient():
    quantizer = build_quantizer({"kind": "log2", "bits": 4})
    a = torch.rand(3, 5).softmax(-1).requires_grad_(True)
    quantizer.calibrate(a.detach())
    out = StraightThrough(quantizer)(a)
    assert torch.equal(out, quantizer(a.detach()))
    out.sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a))


def test_adaround_starts_at_the_weight_and_hardens_onto_the_grid():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    quantizer = _uniform(3, granularity="channel", axis=0)
    quantizer.calibrate(layer.weight.detach())
    original = layer.weight.detach().clone()
    rounding = AdaRoundWeight(quantizer, layer.weight)
    soft = rounding(layer.weight)
    step = quantizer.broadcast(quantizer.scale, original)
    zero_point = quantizer.broadcast(quantizer.zero_point, original)
    # h(α) = the fractional part (kept in [1e-4, 1 − 1e-4]): W itself, clamped to the code range
    unrounded = (torch.clamp(original / step + zero_point, quantizer.q_min, quantizer.q_max) - zero_point) * step
    assert torch.allclose(soft, unrounded, atol=2e-4 * float(step.max()))
    assert rounding.regularizer(2.0).item() > 0
    rounding.alpha.data = torch.where(rounding.alpha > 0, 50.0, -50.0)  # decided roundings
    assert rounding.regularizer(2.0).item() == pytest.approx(0.0, abs=1e-6)
    rounding.commit(layer)
    assert torch.equal(quantizer(layer.weight.detach()), layer.weight.detach())  # on the grid
    assert torch.all((layer.weight.detach() - original).abs() <= step * (1 + 1e-5))  # floor or ceil


def test_stage_reconstruction_lowers_the_output_error_and_leaves_weights_on_the_grid():
    _, images, qmodel = quantized_test_vit("repq-vit", 4, 4)
    stage = qmodel.stages()[1]
    x = qmodel.stages()[0].run(images[:2])
    with torch.no_grad(), qmodel.quantization_disabled():
        target = stage.run(x)
    block = qmodel.model.blocks[0]
    before = block.mlp.fc1.weight.detach().clone()
    record = reconstruct_stage(qmodel, stage, x.detach(), target, FAST, progress=False)
    assert record.loss_after < record.loss_before
    assert record.learned_roundings == sum(block.get_submodule(n).weight.numel()
                                           for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        layer = block.get_submodule(name)
        assert torch.equal(layer.weight_quantizer(layer.weight.detach()), layer.weight.detach()), name
    assert not torch.equal(before, block.mlp.fc1.weight.detach())
    assert all(type(q).__name__ != "LearnedStep" for q in qmodel.quantizers().values())  # stand-ins are gone
    assert all(p.requires_grad for p in qmodel.model.parameters())


def test_drop_input_mixes_the_quantized_and_float_stage_inputs_elementwise():
    _, images, qmodel = quantized_test_vit("repq-vit", 4, 4)
    stage = qmodel.stages()[1]
    x = qmodel.stages()[0].run(images[:1]).detach().expand(2, -1, -1).clone()  # both images the same
    x_float = x + 1.0  # tells the two inputs apart element by element
    with torch.no_grad(), qmodel.quantization_disabled():
        target = stage.run(x_float)
    seen = []

    def run(inputs):
        if torch.is_grad_enabled():  # a training step (the losses before and after run without gradients)
            seen.append(inputs.detach().clone())
        return stage.run(inputs)

    settings = make(ReconConfig, **{**FAST.model_dump(), "iterations": 5, "drop_prob": 0.5, "drop_input": True})
    reconstruct_stage(qmodel, Stage(stage.name, stage.modules, run), x, target, settings, x_float=x_float,
                      progress=False)
    assert len(seen) == 5
    for inputs in seen:
        from_float = inputs == x_float
        assert bool((from_float | (inputs == x)).all())
        assert 0.4 < from_float.float().mean().item() < 0.6
    with pytest.raises(VitqError, match="float input"):
        reconstruct_stage(qmodel, stage, x, target, settings, progress=False)
    with pytest.raises(VitqError, match="block"):
        make(ReconConfig, drop_prob=0.5, drop_input=True, unit="layer")
    assert "drop_input" not in ReconConfig(drop_prob=0.5).model_dump()  # older settings keep their key


def test_normalize_starts_every_stage_loss_at_two(monkeypatch):
    _, images, qmodel = quantized_test_vit("repq-vit", 4, 4)
    x = qmodel.stages()[0].run(images[:2]).detach()
    scales, learn = [], recon._learn

    def spy(*args):
        scales.append(args[6])  # loss_scale
        return learn(*args)

    monkeypatch.setattr(recon, "_learn", spy)
    for normalize, stage in ((True, qmodel.stages()[1]), (False, qmodel.stages()[2])):
        with torch.no_grad(), qmodel.quantization_disabled():
            target = stage.run(x)
        settings = make(ReconConfig, **{**TINY.model_dump(), "normalize": normalize})
        record = reconstruct_stage(qmodel, stage, x, target, settings, progress=False)
        assert record.loss_before > 0
        assert scales[-1] * record.loss_before == pytest.approx(2.0 if normalize else record.loss_before)
        x = stage.run(x).detach()
    assert "normalize" not in TINY.model_dump()  # older settings keep their key


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_scale_schedule_anneals_the_step_learning_rate_only(monkeypatch, schedule):
    _, images, qmodel = quantized_test_vit("repq-vit", 4, 4)
    x = qmodel.stages()[0].run(images[:2]).detach()
    with torch.no_grad(), qmodel.quantization_disabled():
        target = qmodel.stages()[1].run(x)
    rates, adam_step = [], torch.optim.Adam.step

    def record(self, *args, **kwargs):
        rates.append([group["lr"] for group in self.param_groups])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    settings = make(ReconConfig, **{**FAST.model_dump(), "scale_schedule": schedule})
    reconstruct_stage(qmodel, qmodel.stages()[1], x, target, settings, progress=False)
    monkeypatch.setattr(torch.optim.Adam, "step", adam_step)
    # the reference: torch's own cosine annealing to 0 over the stage's iterations
    reference = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=FAST.scale_lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=FAST.iterations, eta_min=0)
    expected = []
    for _ in range(FAST.iterations):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        cosine.step()
    assert [r[0] for r in rates] == [FAST.weight_lr] * FAST.iterations  # the rounding variables: constant
    steps = [r[1] for r in rates]
    if schedule == "cosine":
        assert steps == pytest.approx(expected, rel=1e-9, abs=1e-15)
    else:
        assert steps == [FAST.scale_lr] * FAST.iterations
    assert "scale_schedule" not in FAST.model_dump()  # older settings keep their key


def test_relative_steps_move_every_step_of_a_stage_by_a_bounded_fraction():
    _, images, qmodel = quantized_test_vit("repq-vit", 3, 3)
    x = qmodel.stages()[0].run(images[:2]).detach()
    with torch.no_grad(), qmodel.quantization_disabled():
        target = qmodel.stages()[1].run(x)
    stage = qmodel.stages()[1]
    # the activation quantizers whose steps the stage learns (the selection of recon._wrap)
    uniform = [slot.quantizer for slot in qmodel.slots() if slot.role != "weight" and stage.contains(slot.point)
               and type(slot.quantizer) is UniformQuantizer]
    before = [q.scale.clone() for q in uniform]
    lr = 0.01
    settings = make(ReconConfig, **{**FAST.model_dump(), "scale_relative": True, "scale_lr": lr})
    reconstruct_stage(qmodel, stage, x, target, settings, progress=False)
    ratios = torch.cat([(q.scale / start).flatten() for q, start in zip(uniform, before, strict=True)])
    assert before and bool((ratios != 1).any())
    # Adam moves each log-ratio by about lr per iteration at most, whatever the step's size
    assert float(ratios.log().abs().max()) <= FAST.iterations * lr * 1.05
    assert "scale_relative" not in FAST.model_dump() and settings.model_dump()["scale_relative"] is True


def test_layer_unit_fits_each_weight_layer_to_its_float_output():
    _, images, qmodel = quantized_test_vit("repq-vit", 4, 4)
    embed, stage = qmodel.stages()[:2]
    block = qmodel.model.blocks[0]
    with torch.no_grad():
        x = embed.run(images[:2])
        with qmodel.quantization_disabled():
            x_float = embed.run(images[:2])
            qkv_float = block.attn.qkv(block.norm1(x_float))
        qkv_error = (block.attn.qkv(block.norm1(x)) - qkv_float).square().sum(-1).mean().item()
    steps = {name: q.scale.clone() for name, q in qmodel.quantizers().items() if hasattr(q, "scale")
             and name.endswith("input_quantizer") and name.startswith("blocks.0.")}
    records = recon.reconstruct_layers(qmodel, stage, x, x_float, make(ReconConfig, **{**FAST.model_dump(),
                                       "unit": "layer", "learn_steps": False}), progress=False)
    names = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert [r.stage for r in records] == names
    assert records[0].loss_before == pytest.approx(qkv_error, rel=1e-5)  # quantized input vs float layer output
    for record in records:
        assert record.loss_after < record.loss_before, record.stage
        assert record.learned_steps == 0 and record.learned_roundings > 0
    for name in names:
        layer = qmodel.model.get_submodule(name)
        assert torch.equal(layer.weight_quantizer(layer.weight.detach()), layer.weight.detach()), name
    assert all(torch.equal(qmodel.quantizers()[name].scale, scale) for name, scale in steps.items())


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    _, images, qmodel = quantized_test_vit("repq-vit", 4, 4)
    interrupted = copy.deepcopy(qmodel)
    reconstruct_model(qmodel, images[:2], TINY, progress=False)

    original = recon.reconstruct_stage

    def stop_at_block_2(qm, stage, *args, index, **kwargs):
        if index == 3:
            raise KeyboardInterrupt
        return original(qm, stage, *args, index=index, **kwargs)

    monkeypatch.setattr(recon, "reconstruct_stage", stop_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_model(interrupted, images[:2], TINY, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(recon, "reconstruct_stage", original)
    _, _, resumed = quantized_test_vit("repq-vit", 4, 4)  # a fresh process would rebuild the calibrated model
    records = reconstruct_model(resumed, images[:2], TINY, checkpoint_dir=tmp_path, progress=False)
    assert [r.stage for r in records][0] == "blocks.2"
    expected, got = qmodel.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    with pytest.raises(VitqError, match="other settings"):
        reconstruct_model(resumed, images[:2], TINY, seed=1, checkpoint_dir=tmp_path, progress=False)


def test_settings_are_validated_and_beta_decays():
    with pytest.raises(VitqError, match="invalid iterations"):
        make(ReconConfig, iterations=0)
    with pytest.raises(VitqError, match="invalid drop_prob"):
        make(ReconConfig, drop_prob=1.0)
    settings = ReconConfig(iterations=100, warmup=0.2, beta=(20.0, 2.0))
    assert settings.beta_at(10) is None
    assert settings.beta_at(20) == pytest.approx(20.0) and settings.beta_at(100) == pytest.approx(2.0)
    assert settings.beta_at(60) == pytest.approx(11.0)


def test_augmentation_adds_seeded_crops_and_flips(monkeypatch):
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert recon.augmented(images, 0, seed=0) is images
    out = recon.augmented(images, 2, seed=5)
    assert out.shape == (9, 3, 16, 16) and torch.equal(out[:3], images)
    assert torch.equal(out, recon.augmented(images, 2, seed=5))
    assert not torch.equal(out, recon.augmented(images, 2, seed=6))
    monkeypatch.setattr(recon, "CROP_RANGE", (1.0, 1.0))  # full-size crops: each copy is the image or its mirror
    copies = recon.augmented(images, 4, seed=1)[3:].reshape(4, 3, 3, 16, 16)
    mirrored = [[torch.equal(c[i], images[i].flip(-1)) for i in range(3)] for c in copies]
    same = [[torch.equal(c[i], images[i]) for i in range(3)] for c in copies]
    assert all(m or s for row_m, row_s in zip(mirrored, same, strict=True) for m, s in zip(row_m, row_s, strict=True))
    assert any(any(row) for row in mirrored) and any(any(row) for row in same)
