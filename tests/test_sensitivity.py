"""Tests of vitq.eval.sensitivity: the Hutchinson trace against the exact Hessian, each point's numbers against a
direct computation, and the report."""

import json
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from helpers import random_images

import vitq
from vitq.errors import VitqError
from vitq.eval.sensitivity import hutchinson_traces, point_sensitivity, quantized_slots
from vitq.report.sensitivity import JSON_FILE, PLOT_FILE, TABLE_FILE, write_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")


class _TinyNet(torch.nn.Module):
    """Two Linear layers with the one method ``hutchinson_traces`` needs of a quantized model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 5)

    @contextmanager
    def quantization_disabled(self):
        yield self

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_hutchinson_trace_is_the_mean_of_v_h_v_over_its_rademacher_vectors():
    net = _TinyNet()
    x, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(1)), torch.arange(10) % 5
    weights = [net.fc1.weight, net.fc2.weight]
    params = dict(net.named_parameters())

    def loss(w1, w2):
        return F.cross_entropy(torch.func.functional_call(net, {**params, "fc1.weight": w1, "fc2.weight": w2}, (x,)),
                               y)

    # the joint Hessian by autograd, in blocks H[i][j] = d²L / dW_i dW_j, flattened
    blocks = torch.autograd.functional.hessian(loss, tuple(w.detach().clone() for w in weights))
    hessian = [[blocks[i][j].reshape(weights[i].numel(), weights[j].numel()).double() for j in range(2)]
               for i in range(2)]
    samples, generator = 40, torch.Generator().manual_seed(7)
    expected = torch.zeros(2, dtype=torch.float64)
    for _ in range(samples):  # the estimator's own draws: a sign per element, weight after weight
        vs = [(torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).double().reshape(-1) for w in weights]
        for i in range(2):  # one product with the whole Hessian, read per weight
            expected[i] += vs[i] @ sum(hessian[i][j] @ vs[j] for j in range(2)) / samples
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]  # unequal batches: weighted by their sizes
    estimated = hutchinson_traces(net, weights, batches, samples=samples, seed=7)
    torch.testing.assert_close(torch.tensor(estimated, dtype=torch.float64), expected, rtol=1e-4, atol=1e-7)
    # and the estimator converges to the trace (its error falls as 1/sqrt(samples))
    many = hutchinson_traces(net, weights, batches, samples=2000, seed=0)
    for i, got in enumerate(many):
        assert got == pytest.approx(float(hessian[i][i].trace()), rel=0.15)


@pytest.fixture(scope="module")
def measured(float_model):
    images, labels = random_images(6), torch.tensor([3, 1, 4, 1, 5, 9])
    config = vitq.QuantConfig(method="minmax", w_bits=4, a_bits=4, calib_size=3)
    qmodel = vitq.quantize(float_model, config, images[:3], progress=False)
    return qmodel, images, labels, point_sensitivity(qmodel, images, labels, hutchinson_samples=2, progress=False)


def test_each_point_equals_a_direct_computation(measured):
    qmodel, images, labels, results = measured
    slots = quantized_slots(qmodel)
    assert [r.slot for r in results] == [s.name for s in slots]
    with torch.no_grad(), qmodel.quantization_disabled():
        reference = qmodel(images).double().log_softmax(-1)
    for index in (0, 7):  # patch_embed's weight, then an activation of the first block
        slot, result = slots[index], results[index]
        flags = {s.name: s.quantizer.enabled for s in slots}
        try:  # only this point quantized, by hand
            for other in slots:
                other.quantizer.enabled = other is slot
            with torch.no_grad():
                log_probs = qmodel(images).double().log_softmax(-1)
        finally:
            for other in slots:
                other.quantizer.enabled = flags[other.name]
        kl = float((reference.exp() * (reference - log_probs)).sum(-1).mean())
        assert result.kl == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert result.top1 == pytest.approx(100 * float((log_probs.argmax(-1) == labels).double().mean()))
    weight_slot, weight_result = slots[0], results[0]
    weight = weight_slot.module.weight.detach()
    with torch.no_grad():
        error = float((weight_slot.quantizer(weight) - weight).double().square().sum())
    assert weight_result.sqnr_db == pytest.approx(10 * math.log10(float(weight.double().square().sum()) / error))
    assert weight_result.hawq == pytest.approx(weight_result.hessian_trace * error)
    assert all((r.hessian_trace is None) == (r.role != "weight") for r in results)


def test_report_ranks_points_and_writes_table_json_and_plot(measured, tmp_path):
    _, _, _, results = measured
    written = write_sensitivity(tmp_path, results, ["- a header line"], "title")
    assert [p.name for p in written] == [TABLE_FILE, JSON_FILE, PLOT_FILE] and all(p.stat().st_size for p in written)
    table = (tmp_path / TABLE_FILE).read_text()
    ranked_slots = [line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| ")][2:]
    assert ranked_slots[0] == max(results, key=lambda r: r.kl).slot and len(ranked_slots) == len(results)
    saved = json.loads((tmp_path / JSON_FILE).read_text())
    assert [r["slot"] for r in saved] == [r.slot for r in results]


def test_bad_arguments_are_refused(measured):
    qmodel, images, labels, _ = measured
    with pytest.raises(VitqError, match="labelled images"):
        point_sensitivity(qmodel, images, labels[:2])
    with pytest.raises(VitqError, match="hutchinson_samples"):
        point_sensitivity(qmodel, images, labels, hutchinson_samples=-1)


def test_named_slots_alone_are_measured_with_the_same_numbers(measured):
    qmodel, images, labels, results = measured
    chosen = {results[0].slot, results[7].slot}
    subset = point_sensitivity(qmodel, images, labels, hutchinson_samples=0, progress=False, slots=chosen)
    assert [r.slot for r in subset] == [results[0].slot, results[7].slot]
    assert [r.kl for r in subset] == [results[0].kl, results[7].kl]
