"""RepQ-ViT scale reparameterization (vitq.methods.repq_vit.reparam; docs/methods/repq-vit.md,
docs/protocol.md#target-cancellation, docs/protocol.md#constant-layernorm-channels)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_norms
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vitq.api import prepare
from vitq.calib.runner import run_stagewise
from vitq.config import QuantConfig
from vitq.methods.repq_vit.reparam import (
    fold_channel_scales,
    fold_parameters,
    reparameterize_model,
    reparameterize_stage,
)
from vitq.nn import QLinear
from vitq.quantizers import UniformQuantizer

timm = pytest.importorskip("timm")

SWIN_KWARGS = {"embed_dim": 24, "depths": (2, 2), "num_heads": (3, 6), "img_size": 112}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return randomize_norms(timm.create_model("test_vit", pretrained=False).eval())


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SWIN_KWARGS)
    return randomize_norms(model.eval())


def _qmodel(model, name, bits=8):
    return prepare(model, QuantConfig(method="minmax", w_bits=bits, a_bits=bits), model_name=name)


def _images(model, n=2, seed=1):
    size = model.patch_embed.img_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- adapters
def test_norm_linear_pairs_vit(vit):
    qmodel = _qmodel(vit, "test_vit")
    expected = []
    for i in range(len(vit.blocks)):
        expected += [(f"blocks.{i}.norm1", f"blocks.{i}.attn.qkv"), (f"blocks.{i}.norm2", f"blocks.{i}.mlp.fc1")]
    assert qmodel.norm_linear_pairs() == expected
    assert type(vit).__name__ == "VisionTransformer" and len(expected) == 12


def test_norm_linear_pairs_swin(swin):
    qmodel = _qmodel(swin, "swin_tiny_patch4_window7_224")
    expected = []
    for i, depth in enumerate(SWIN_KWARGS["depths"]):
        if i > 0:
            expected.append((f"layers.{i}.downsample.norm", f"layers.{i}.downsample.reduction"))
        for j in range(depth):
            expected += [(f"layers.{i}.blocks.{j}.norm1", f"layers.{i}.blocks.{j}.attn.qkv"),
                         (f"layers.{i}.blocks.{j}.norm2", f"layers.{i}.blocks.{j}.mlp.fc1")]
    assert qmodel.norm_linear_pairs() == expected
    for norm, linear in expected:  # every pair is a real LayerNorm feeding a quantized Linear
        assert isinstance(qmodel.model.get_submodule(norm), nn.LayerNorm)
        assert isinstance(qmodel.model.get_submodule(linear), QLinear)


# ------------------------------------------------------------------------------------------- float function
FOLD_OPTIONS = [
    pytest.param({"target": "mean"}, id="mean"),
    pytest.param({"target": "median"}, id="median"),
    pytest.param({"target": "median", "ratio_bound": 2.0}, id="median-rho2"),
]


@pytest.mark.parametrize("options", FOLD_OPTIONS)
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_fold_preserves_float_logits(request, arch, options):
    model = request.getfixturevalue(arch)
    name = "test_vit" if arch == "vit" else "swin_tiny_patch4_window7_224"
    images = _images(model)
    with torch.no_grad():
        reference = model(images)
    qmodel = _qmodel(model, name)
    folds = reparameterize_model(qmodel, images, progress=False, **options)
    assert [(f.norm, f.linear) for f in folds] == qmodel.norm_linear_pairs()
    if arch == "swin":
        assert "layers.1.downsample.reduction" in {f.linear for f in folds}
        assert qmodel.model.layers[1].downsample.reduction.bias is not None  # created by the fold
    assert max(float((f.result.ratio - 1).abs().max()) for f in folds) > 0.5  # the fold really rescaled
    if "ratio_bound" in options:
        assert all(float(f.result.ratio.max()) <= 2.0 and float(f.result.ratio.min()) >= 0.5 for f in folds)
        assert sum(f.result.num_bounded for f in folds) > 0
    # the input quantizers are per-tensor again, with the declared spec and the fold's (s̃, z̃)
    for fold in folds:
        linear = qmodel.model.get_submodule(fold.linear)
        assert linear.input_quantizer.granularity == "tensor"
        assert float(linear.input_quantizer.scale) == float(fold.result.scale)
    with torch.no_grad(), qmodel.quantization_disabled():
        folded = qmodel(images)
    torch.testing.assert_close(folded, reference, rtol=0, atol=1e-4)
    with torch.no_grad():  # and the quantized model still runs to finite logits
        assert torch.isfinite(qmodel(images)).all()


def test_stage_restores_declared_spec_and_recalibrates_weights(vit):
    qmodel = _qmodel(vit, "test_vit", bits=4)
    declared = {name: spec for name, spec in qmodel.quant_specs().items()}
    folds = []
    run_stagewise(qmodel, _images(vit), lambda stage, x: folds.extend(reparameterize_stage(qmodel, stage, x)),
                  progress=False)
    assert qmodel.quant_specs() == declared  # same structure: a saved model rebuilds from the specs
    for fold in folds:
        linear = qmodel.model.get_submodule(fold.linear)
        fresh = UniformQuantizer(**{k: v for k, v in linear.weight_quantizer.spec().items() if k != "kind"})
        fresh.calibrate(linear.weight.detach())
        torch.testing.assert_close(linear.weight_quantizer.scale, fresh.scale, rtol=0, atol=0)
        assert linear.input_quantizer.scale.shape == (1,)


# ------------------------------------------------------------------------------------------- integer codes
@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    channels=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    target=st.sampled_from(["mean", "median", "explicit"]),
)
def test_per_tensor_codes_of_folded_activation_equal_per_channel_codes(bits, channels, seed, target):
    """Per-tensor codes of X' = X/r − b under (s̃, z̃) == per-channel codes of X under (s, z), exactly.

    Setup: unbounded fold, integer target zero point (``round_zero_point``; an unrounded z̃ shifts
    every code by frac(z̃), docs/protocol.md#target-cancellation), float64 arithmetic, and data whose per-channel
    continuous code u = X/s + z stays >= 0.1 away from every rounding boundary k + 1/2. Algebraically X'/s̃ + z̃ = u
    exactly; float64 only perturbs it by ~1e-13, so round() cannot flip, and there are no ties
    (round-half-to-even is not invariant to an odd integer shift, so ties would be ill-defined).
    Codes beyond the range exercise the clamp.
    """
    gen = torch.Generator().manual_seed(seed)
    q_min, q_max = 0, 2**bits - 1
    scale = torch.exp(torch.empty(channels, dtype=torch.float64).uniform_(-6, 4, generator=gen))  # ~2.5e-3..55
    zero_point = torch.randint(-2**bits, 2 ** (bits + 1), (channels,), generator=gen).double()
    codes = torch.randint(q_min - 3, q_max + 4, (64, channels), generator=gen).double()
    offset = torch.empty(64, channels, dtype=torch.float64).uniform_(-0.4, 0.4, generator=gen)
    x = (codes + offset - zero_point) * scale

    fold_target = (scale.mean() * 1.37, torch.tensor(3.0)) if target == "explicit" else target
    result = fold_parameters(scale, zero_point, target=fold_target, round_zero_point=True,
                             code_range=(q_min, q_max), qparam_dtype=torch.float64)
    assert result.num_degenerate == 0
    assert float(result.zero_point) == round(float(result.zero_point))
    x_folded = x / result.ratio - result.shift

    per_channel = UniformQuantizer(bits, granularity="channel", axis=-1)
    per_channel.set_params({"scale": scale, "zero_point": zero_point})
    per_tensor = UniformQuantizer(bits)
    per_tensor.set_params({"scale": result.scale.reshape(1), "zero_point": result.zero_point.reshape(1)})
    assert torch.equal(per_tensor.int_repr(x_folded), per_channel.int_repr(x))
    # and the dequantized values are the same function of the input (one grid per channel, rescaled)
    torch.testing.assert_close(per_tensor(x_folded), per_channel(x) / result.ratio - result.shift,
                               rtol=1e-12, atol=1e-12 * float(scale.max()))


def test_float32_layernorm_fold_codes_almost_always_equal():
    """The same identity through a real float32 LayerNorm + Linear: the folded LayerNorm computes X'
    with float32 rounding, so a code may flip where X/s + z lies within ~1e-6 of a rounding boundary.
    Demand: at most 0.1 % of the codes differ, and never by more than one step."""
    torch.manual_seed(0)
    norm, linear = _layernorm_linear(64, 96, torch.float32)
    inputs = torch.randn(2048, 64)
    with torch.no_grad():
        x = norm(inputs)
    per_channel = UniformQuantizer(6, granularity="channel", axis=-1)
    per_channel.calibrate(x)
    result = fold_channel_scales(norm, linear, per_channel.scale, per_channel.zero_point, round_zero_point=True,
                                 code_range=(0, 63))
    per_tensor = UniformQuantizer(6)
    per_tensor.set_params({"scale": result.scale.float().reshape(1),
                           "zero_point": result.zero_point.float().reshape(1)})
    with torch.no_grad():
        diff = (per_tensor.int_repr(norm(inputs)) - per_channel.int_repr(x)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3


# ------------------------------------------------------------ docs/protocol.md#target-cancellation
def _layernorm_linear(channels, out_features, dtype, *, outliers=(3, 17, 29), seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(channels, dtype=dtype)
    linear = QLinear(nn.Linear(channels, out_features, dtype=dtype), "post_ln")
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=gen, dtype=dtype) + 0.5)
        norm.weight[list(o for o in outliers if o < channels)] *= 30  # outliers: docs/protocol.md#target-cancellation
        norm.bias.copy_(torch.randn(channels, generator=gen, dtype=dtype))
        linear.weight.copy_(torch.randn(out_features, channels, generator=gen, dtype=dtype) / channels**0.5)
        linear.bias.copy_(torch.randn(out_features, generator=gen, dtype=dtype))
    return norm, linear


def _quantized_output_after_fold(norm, linear, inputs, scale, zero_point, bits, **fold_options):
    """Fold into copies, then Q_w(W') Q_a(X') + β' with X' per-tensor (s̃, z̃) and W' per-row min-max
    (computed in float64 via ``set_range`` so that only the fold, not float32 rounding, is tested)."""
    norm, linear = copy.deepcopy(norm), copy.deepcopy(linear)
    result = fold_channel_scales(norm, linear, scale, zero_point, code_range=(0, 2**bits - 1), **fold_options)
    linear.input_quantizer = UniformQuantizer(bits)
    linear.input_quantizer.set_params({"scale": result.scale.reshape(1), "zero_point": result.zero_point.reshape(1)})
    linear.weight_quantizer = UniformQuantizer(bits, granularity="channel", axis=0)
    linear.weight_quantizer.set_range(linear.weight.detach().amin(dim=1), linear.weight.detach().amax(dim=1))
    with torch.no_grad():
        x_folded = norm(inputs)
        return linear(x_folded), linear.input_quantizer.int_repr(x_folded), result


@pytest.fixture(scope="module")
def outlier_pair():
    """docs/protocol.md#target-cancellation setup, smaller: LayerNorm-like activation with 3 outlier channels (x30),
    48 → 64 Linear, float64 throughout, per-channel min-max calibration at 4 bits."""
    norm, linear = _layernorm_linear(48, 64, torch.float64)
    inputs = torch.randn(1024, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = norm(inputs)
    per_channel = UniformQuantizer(4, granularity="channel", axis=-1)
    per_channel.set_range(x.amin(dim=0), x.amax(dim=0))  # float64 (calibrate() would compute in float32)
    return norm, linear, inputs, per_channel.scale, per_channel.zero_point


def test_unbounded_fold_target_scale_cancels(outlier_pair):
    """docs/protocol.md#target-cancellation: for an unbounded fold, s̃ → k·s̃ gives X' → k·X' and W' → W'/k, and both
    per-tensor activation and per-row weight quantization are equivariant to k: same codes, same output. So a
    'median vs mean' gain must come from the zero point's rounding, not from the scale."""
    norm, linear, inputs, scale, zero_point = outlier_pair
    z_t = torch.round(torch.quantile(zero_point, 0.5))
    s_mean, s_big = scale.mean(), 7 * torch.quantile(scale, 0.5)
    assert float(s_big / s_mean) not in (0.5, 1.0, 2.0, 4.0)  # not a power of two: no trivially exact scaling
    y_mean, codes_mean, _ = _quantized_output_after_fold(norm, linear, inputs, scale, zero_point, 4,
                                                         target=(s_mean, z_t))
    y_big, codes_big, _ = _quantized_output_after_fold(norm, linear, inputs, scale, zero_point, 4,
                                                       target=(s_big, z_t))
    # float64: equal up to ~1e-15 relative rounding (no code sits that close to a rounding boundary)
    assert torch.equal(codes_mean, codes_big)
    torch.testing.assert_close(y_big, y_mean, rtol=1e-9, atol=1e-9)
    # the same holds for the named targets once their zero point is the same integer
    y_median, _, res = _quantized_output_after_fold(norm, linear, inputs, scale, zero_point, 4, target="median",
                                                    round_zero_point=True)
    assert float(res.zero_point) == float(z_t)
    torch.testing.assert_close(y_median, y_mean, rtol=1e-9, atol=1e-9)


def test_bounded_fold_target_matters(outlier_pair):
    norm, linear, inputs, scale, zero_point = outlier_pair
    z_t = torch.round(torch.quantile(zero_point, 0.5))
    with torch.no_grad():
        reference = linear(norm(inputs))  # quantizers unset: float
    outputs = {}
    for name, s_t in (("mean", scale.mean()), ("7median", 7 * torch.quantile(scale, 0.5))):
        y, _, result = _quantized_output_after_fold(norm, linear, inputs, scale, zero_point, 4,
                                                    target=(s_t, z_t), ratio_bound=2.0)
        assert result.num_bounded > 0
        outputs[name] = y
    err = {k: float((y - reference).norm() / reference.norm()) for k, y in outputs.items()}
    assert abs(err["mean"] - err["7median"]) > 1e-3, err
    assert float((outputs["mean"] - outputs["7median"]).norm() / reference.norm()) > 1e-3


def test_bounded_fold_preserves_float_function(outlier_pair):
    norm, linear, inputs, scale, zero_point = outlier_pair
    with torch.no_grad():
        reference = linear(norm(inputs))
    for bound in (1.0, 1.5, 4.0):
        n2, l2 = copy.deepcopy(norm), copy.deepcopy(linear)
        result = fold_channel_scales(n2, l2, scale, zero_point, target="median", ratio_bound=bound,
                                     code_range=(0, 15))
        assert float(result.ratio.max()) <= bound and float(result.ratio.min()) >= 1 / bound
        with torch.no_grad():
            torch.testing.assert_close(l2(n2(inputs)), reference, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------ docs/protocol.md#constant-layernorm-channels
def test_constant_channel_is_left_unfolded_and_w8a8_stays_close():
    """A LayerNorm weight of exactly 0 makes its channel the constant β_c (and 0 when β_c = 0 too).
    That channel must not enter mean(s)/mean(z) and must stay unfolded; W8A8 stays near float."""
    torch.manual_seed(0)
    norm, linear = _layernorm_linear(32, 48, torch.float32, outliers=())
    with torch.no_grad():
        norm.weight[5], norm.bias[5] = 0.0, 0.7  # constant channel
        norm.weight[9], norm.bias[9] = 0.0, 0.0  # all-zero channel: step MIN_SCALE, the tiny-scale case
    inputs = torch.randn(1024, 32)
    with torch.no_grad():
        x = norm(inputs)
        reference = linear(x)
    per_channel = UniformQuantizer(8, granularity="channel", axis=-1)
    per_channel.calibrate(x)
    assert float(per_channel.scale[9]) <= 1e-6 * float(per_channel.scale.median())

    gamma_before, beta_before = norm.weight.detach().clone(), norm.bias.detach().clone()
    result = fold_channel_scales(norm, linear, per_channel.scale, per_channel.zero_point, target="mean",
                                 code_range=(0, 255))
    assert result.degenerate.nonzero().flatten().tolist() == [5, 9]
    for tensor in (result.ratio, result.shift, norm.weight, norm.bias, linear.weight, linear.bias):
        assert torch.isfinite(tensor).all()
    assert result.ratio[[5, 9]].tolist() == [1.0, 1.0] and result.shift[[5, 9]].tolist() == [0.0, 0.0]
    assert norm.weight[[5, 9]].tolist() == [0.0, 0.0]
    assert norm.bias[[5, 9]].tolist() == beta_before[[5, 9]].tolist()
    keep = torch.ones(32, dtype=torch.bool)
    keep[[5, 9]] = False
    assert float(result.scale) == pytest.approx(float(per_channel.scale[keep].double().mean()), rel=1e-6)
    assert float(result.zero_point) == pytest.approx(float(per_channel.zero_point[keep].double().mean()), rel=1e-6)
    assert not torch.equal(norm.weight.detach(), gamma_before)  # the other channels were folded

    linear.input_quantizer = UniformQuantizer(8)
    linear.input_quantizer.set_params({"scale": result.scale.float().reshape(1),
                                       "zero_point": result.zero_point.float().reshape(1)})
    linear.weight_quantizer = UniformQuantizer(8, granularity="channel", axis=0)
    linear.weight_quantizer.calibrate(linear.weight.detach())
    with torch.no_grad():
        quantized = linear(norm(inputs))
    assert float((quantized - reference).norm() / reference.norm()) < 0.02


def test_garbage_channel_statistics_are_excluded():
    """The collapse of docs/protocol.md#constant-layernorm-channels in another implementation: step → 0 and zero point
    → huge (or inf). Such channels must not move the target, and get r = 1, b = 0 without NaN."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(16, generator=gen) + 0.1
    zero_point = torch.randint(0, 16, (16,), generator=gen).float()
    clean = fold_parameters(scale, zero_point, code_range=(0, 15))
    bad_scale, bad_zp = scale.clone(), zero_point.clone()
    bad_scale[2], bad_zp[2] = 1e-12, 1e9
    bad_scale[7], bad_zp[7] = 0.0, float("inf")
    bad_scale[11], bad_zp[11] = float("nan"), 3.0
    for target in ("mean", "median"):
        result = fold_parameters(bad_scale, bad_zp, target=target, ratio_bound=None, code_range=(0, 15))
        keep = torch.ones(16, dtype=torch.bool)
        keep[[2, 7, 11]] = False
        reference = fold_parameters(scale[keep], zero_point[keep], target=target, code_range=(0, 15))
        assert result.degenerate.nonzero().flatten().tolist() == [2, 7, 11]
        assert float(result.scale) == float(reference.scale) and float(result.zero_point) == float(reference.zero_point)
        assert torch.isfinite(result.ratio).all() and torch.isfinite(result.shift).all()
        assert result.ratio[~keep].tolist() == [1.0] * 3 and result.shift[~keep].tolist() == [0.0] * 3
    assert float(clean.scale) == pytest.approx(float(scale.double().mean()))


# ------------------------------------------------------------------------------------------- SOSF hook
def test_target_search_callback(vit):
    images = _images(vit)
    with torch.no_grad():
        reference = vit(images)
    qmodel = _qmodel(vit, "test_vit", bits=4)
    seen = []

    def search(ctx):
        assert ctx.inputs.shape[-1] == ctx.norm.weight.numel() and ctx.inputs.shape[0] > 0
        candidates = {"mean": "mean", "median": "median"}
        for q in (0.25, 0.75):
            candidates[f"q{q}"] = (torch.quantile(ctx.scale.double(), q), torch.quantile(ctx.zero_point.double(), q))
        errors = {name: ctx.output_error(t, ratio_bound=2.0) for name, t in candidates.items()}
        best = min(errors, key=errors.get)
        result = ctx.fold(candidates[best], ratio_bound=2.0)
        seen.append((ctx.linear_name, float(result.scale)))
        return result.scale, result.zero_point, 2.0

    folds = reparameterize_model(qmodel, images, progress=False, target_search=search)
    assert [name for name, _ in seen] == [f.linear for f in folds] and len(folds) == 12
    assert [s for _, s in seen] == [float(f.result.scale) for f in folds]
    assert all(f.ratio_bound == 2.0 for f in folds)
    with torch.no_grad(), qmodel.quantization_disabled():
        torch.testing.assert_close(qmodel(images), reference, rtol=0, atol=1e-4)


def test_recalibrate_input_after_bounded_fold(vit):
    images = _images(vit)
    with torch.no_grad():
        reference = vit(images)
    qmodel = _qmodel(vit, "test_vit", bits=4)
    folds = reparameterize_model(qmodel, images, progress=False, target="median", ratio_bound=2.0,
                                 recalibrate_input=True)
    moved = 0
    for fold in folds:
        quantizer = qmodel.model.get_submodule(fold.linear).input_quantizer
        assert quantizer.is_calibrated and quantizer.granularity == "tensor"
        moved += float(quantizer.scale) != float(fold.result.scale)
    assert moved > 0  # the per-tensor grid now comes from the folded data, not from (s̃, z̃)
    with torch.no_grad(), qmodel.quantization_disabled():
        torch.testing.assert_close(qmodel(images), reference, rtol=0, atol=1e-4)
