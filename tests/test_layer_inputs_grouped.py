"""Grouped and depthwise convolutions in the weight-rounding methods (``gptq``, ``erq``): a conv with G groups is G
independent layers, so its input moments, and the weights GPTQ and ERQ give it, must be those of G separate convs
(each group's input channels and weight rows sliced out); then both methods end to end on hybrid smoke models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitq
from vitq.calib.layer_inputs import InputMoments, gather_input_moments, input_rows
from vitq.config import QuantConfig
from vitq.errors import VitqError
from vitq.methods import method_class
from vitq.nn import QConv2d
from vitq.quantizers import build_quantizer

pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

#: (in channels, out channels, groups): grouped with two input channels and two weight rows per group, depthwise
CONVS = [(6, 6, 3), (4, 4, 4)]
KERNEL = {"kernel_size": 3, "stride": 2, "padding": 1}


def _conv(c_in: int, c_out: int, groups: int, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, groups=groups, **KERNEL)


def _images(c_in: int, seed: int = 1, dead: bool = True) -> torch.Tensor:
    """Correlated channels and neighbouring pixels (as real activations are: else a depthwise conv's Hessian is
    nearly diagonal and GPTQ is round-to-nearest); with ``dead``, channel 2 is all zero (dead inputs of a group)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.einsum("bchw,cd->bdhw", torch.randn(5, c_in, 5, 5, generator=gen), torch.randn(c_in, c_in, generator=gen))
    x = F.interpolate(x, size=(9, 9), mode="bilinear", align_corners=True)
    if dead:
        x[:, 2] = 0.0
    return x + 0.3 * (x != 0)


def _act_quantizer(x: torch.Tensor):
    quantizer = build_quantizer({"kind": "uniform", "bits": 4})
    quantizer.calibrate(x)
    return quantizer


def _point(conv: nn.Conv2d, input_quantizer, weight_spec: dict) -> QConv2d:
    """``conv`` as a quantization point with ``input_quantizer`` and a ``weight_spec`` weight quantizer calibrated on
    its weight."""
    point = QConv2d(conv, "act")
    point.input_quantizer = input_quantizer
    point.weight_quantizer = build_quantizer(weight_spec)
    point.weight_quantizer.calibrate(point.weight.detach())
    return point


def _separate(conv: nn.Conv2d) -> list[nn.Conv2d]:
    """The G ordinary convs that compute ``conv``: group g's weight rows, bias and input channels."""
    rows, channels = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    parts = []
    for g in range(conv.groups):
        part = nn.Conv2d(channels, rows, **KERNEL)
        with torch.no_grad():
            part.weight.copy_(conv.weight[g * rows:(g + 1) * rows])
            part.bias.copy_(conv.bias[g * rows:(g + 1) * rows])
        parts.append(part)
    return parts


def _group_inputs(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    return x.chunk(groups, dim=1)


def test_separate_convs_compute_the_grouped_conv():
    conv = _conv(6, 6, 3)
    x = _images(6)
    parts = [part(x_g) for part, x_g in zip(_separate(conv), _group_inputs(x, 3), strict=True)]
    torch.testing.assert_close(torch.cat(parts, dim=1), conv(x))


# ------------------------------------------------------------------------------------------ input moments
def _unfolded(x: torch.Tensor) -> torch.Tensor:
    """im2col rows of a dense conv (``N × C·kh·kw``), with a ones column, in float64."""
    patches = F.unfold(x, KERNEL["kernel_size"], padding=KERNEL["padding"], stride=KERNEL["stride"])
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


@pytest.mark.parametrize(("c_in", "c_out", "groups"), CONVS)
def test_grouped_moments_are_each_groups_unfolded_moments(c_in, c_out, groups):
    conv = _conv(c_in, c_out, groups)
    x = _images(c_in)
    point = _point(conv, _act_quantizer(x), {"kind": "uniform", "bits": 4, "granularity": "channel", "axis": 0})
    (m,), out = gather_input_moments(point, x, [point], float_inputs=True, batch_size=2)
    width = c_in // groups * 9 + 1
    assert m.groups == groups and m.quantized.shape == (groups, width, width) and m.channels == width - 1
    assert m.rows == 5 * 5 * 5
    x_q = point.input_quantizer(x)
    for g, (quantized, plain) in enumerate(zip(_group_inputs(x_q, groups), _group_inputs(x, groups), strict=True)):
        a, b = _unfolded(quantized), _unfolded(plain)
        torch.testing.assert_close(m.quantized[g], a.T @ a)
        torch.testing.assert_close(m.cross[g], a.T @ b)
        torch.testing.assert_close(m.float[g], b.T @ b)
    torch.testing.assert_close(out, point(x))


@pytest.mark.parametrize(("c_in", "c_out", "groups"), CONVS)
def test_grouped_input_rows_reproduce_the_convolution(c_in, c_out, groups):
    conv = _conv(c_in, c_out, groups)
    x = _images(c_in)
    rows = input_rows(QConv2d(conv, "act"), x)
    weight = conv.weight.reshape(groups, c_out // groups, -1)
    out = rows @ weight.mT + conv.bias.reshape(groups, 1, -1)  # G × N × out/G
    expected = conv(x).permute(1, 0, 2, 3).reshape(groups, c_out // groups, -1).mT
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_per_group_pairs_weight_rows_with_their_moments():
    moments = InputMoments(torch.randn(3, 4, 4), torch.randn(3, 4, 4), None, 10)
    groups = moments.per_group(6)
    assert [rows for rows, _ in groups] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert all(torch.equal(m.quantized, moments.quantized[g]) and torch.equal(m.cross, moments.cross[g])
               and m.float is None and m.rows == 10 for g, (_, m) in enumerate(groups))
    assert moments.split_rows(torch.arange(12).reshape(6, 2)).shape == (3, 2, 2)
    dense = InputMoments(torch.randn(4, 4), None, None, 10)
    assert dense.groups == 1 and dense.per_group(6) == [(slice(0, 6), dense)]
    with pytest.raises(VitqError, match="do not split into 3 convolution groups"):
        moments.per_group(5)


# ---------------------------------------------------------------------- the methods: grouped = separate convs
def _weight_and_bias(point: QConv2d) -> torch.Tensor:
    """``[W, b]`` (``out × (C+1)``)."""
    return torch.cat([point.weight.detach().reshape(point.weight.shape[0], -1),
                      point.bias.detach()[:, None]], dim=1)


def _grouped_and_separate(method_name: str, options: dict, c_in: int, c_out: int, groups: int, run, dead: bool):
    """``run(method, point, x)`` on the grouped conv's point, then on each separate conv's point (each with its own
    method object). Returns the grouped layer's new ``[W, b]``, the separate ones' stacked, the original weights
    rounded to nearest, the grouped layer's method and the separate ones'."""
    conv = _conv(c_in, c_out, groups)
    x = _images(c_in, dead=dead)
    config = QuantConfig(method=method_name, w_bits=3, a_bits=4, options=options)
    spec = method_class(method_name)(config).quantizer_spec("weight")
    act = _act_quantizer(x)  # per tensor: quantizing each group's slice = slicing the quantized input
    grouped = _point(copy.deepcopy(conv), act, spec)
    nearest = grouped.weight_quantizer(grouped.weight).detach().reshape(c_out, -1)
    grouped_method = method_class(method_name)(config)
    run(grouped_method, grouped, x)
    separate, methods = [], []
    for part, x_g in zip(_separate(conv), _group_inputs(x, groups), strict=True):
        point = _point(part, copy.deepcopy(act), spec)
        methods.append(method_class(method_name)(config))
        run(methods[-1], point, x_g)
        separate.append(_weight_and_bias(point))
    torch.testing.assert_close(grouped.weight_quantizer(grouped.weight), grouped.weight, atol=0, rtol=0)
    return _weight_and_bias(grouped), torch.cat(separate), nearest, grouped_method, methods


def _gptq(method, point: QConv2d, x: torch.Tensor) -> None:
    (m,), _ = gather_input_moments(point, x, [point])
    method._round_layer("conv", point, m)


def _erq(method, point: QConv2d, x: torch.Tensor) -> None:
    (m,), _ = gather_input_moments(point, x, [point], float_inputs=True)
    method._reduce_errors("conv", point, m, lam=1.0, lam_aqer=1.0)


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"group_size": 3}, {"group_size": 3, "act_order": True}])
@pytest.mark.parametrize(("c_in", "c_out", "groups"), CONVS)
def test_gptq_rounds_a_grouped_conv_as_its_separate_convs(options, c_in, c_out, groups):
    grouped, separate, nearest, _, _ = _grouped_and_separate("gptq", options, c_in, c_out, groups, _gptq, dead=True)
    torch.testing.assert_close(grouped, separate, atol=1e-6, rtol=0)
    assert not torch.equal(grouped[:, :-1], nearest)  # the compensation did change the rounding


@pytest.mark.parametrize("options", [{}, {"refine_iters": 0}])
@pytest.mark.parametrize(("c_in", "c_out", "groups"), CONVS)
def test_erq_rounds_a_grouped_conv_as_its_separate_convs(options, c_in, c_out, groups):
    # no dead inputs: a depthwise group without input would be a tie of ERQ and plain rounding, which the
    # safeguard breaks on rounding noise
    grouped, separate, nearest, method, methods = _grouped_and_separate("erq", options, c_in, c_out, groups, _erq,
                                                                        dead=False)
    # the safeguard compares the whole layer: equal to the separate convs' where neither keeps plain rounding
    (error,) = method.layer_errors
    parts = [m.layer_errors[0] for m in methods]
    assert not error.kept_plain and not any(part.kept_plain for part in parts)
    assert error.erq == pytest.approx(sum(part.erq for part in parts), rel=1e-9)
    assert error.plain == pytest.approx(sum(part.plain for part in parts), rel=1e-9)
    assert error.erq < error.plain
    torch.testing.assert_close(grouped, separate, atol=1e-6, rtol=1e-6)
    assert not torch.equal(grouped[:, :-1], nearest)


# ----------------------------------------------------------------------------------------------- end to end
#: logit SQNR floor of gptq/erq W4A4 on the random smoke models, on their 2 calibration images (measured: gptq / erq
#: TinyViT 11.0 / 11.7 dB, MobileViT 16.5 / 15.5 dB, erq with quantized inputs ~40 dB on both; their
#: round-to-nearest twin repq-vit: 8.2 and 12.7 dB)
SQNR_FLOOR_DB = 6.0


@pytest.mark.parametrize(("method", "options"), [("gptq", {}), ("erq", {}), ("erq", {"inputs": "quantized"})])
@pytest.mark.parametrize("family", ["tinyvit", "mobilevit"])
def test_hybrid_smoke_models_with_depthwise_convs_round_every_conv_onto_its_grid(family, method, options):
    from vitq.models.smoke import SMOKE_OPTIONS, build_smoke_model, smoke_configs, smoke_images

    config = smoke_configs()[family]
    model = build_smoke_model(config)
    x = smoke_images(model)
    qmodel = vitq.quantize(model, QuantConfig(method=method, w_bits=4, a_bits=4, calib_size=2,
                                              options={**SMOKE_OPTIONS.get(method, {}), **options}),
                           x, model_name=config.timm_name, progress=False)
    convs = {name: p for name, p in qmodel.points().items() if isinstance(p, QConv2d)}
    assert any(p.groups > 1 for p in convs.values())
    for name, point in convs.items():
        torch.testing.assert_close(point.weight_quantizer(point.weight), point.weight, atol=0, rtol=0,
                                   msg=f"{name} is not on its grid")
    with torch.no_grad():
        out, reference = qmodel(x), model(x)
    sqnr = float(10 * torch.log10(reference.square().mean() / (out - reference).square().mean()))
    assert math.isfinite(sqnr) and sqnr > SQNR_FLOOR_DB, sqnr
