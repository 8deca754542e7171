"""The reconstruction-based methods (brecq, qdrop) and reconstruction as an option of any method."""

import pytest
import torch
from helpers import quantized_test_vit

import vitq
from vitq.config import QuantConfig, ReconConfig, make
from vitq.errors import VitqError
from vitq.methods import method_class


def _reconstruction(method: str, **recon):
    given = None if not recon else make(ReconConfig, **recon)
    config = QuantConfig(method=method, w_bits=4, a_bits=4, reconstruct=given)
    return method_class(config.method)(config).reconstruction()


def test_who_reconstructs_and_with_which_settings():
    assert _reconstruction("repq-vit") is None  # calibration only unless asked
    assert _reconstruction("repq-vit", iterations=7).iterations == 7
    assert _reconstruction("brecq") == ReconConfig()
    qdrop = _reconstruction("qdrop")
    assert qdrop.drop_prob == 0.5 and qdrop.iterations == ReconConfig().iterations
    # the user's explicit settings win over the method's defaults; the others keep them
    assert _reconstruction("qdrop", iterations=3) == ReconConfig(iterations=3, drop_prob=0.5)
    assert _reconstruction("qdrop", drop_prob=0.1).drop_prob == 0.1


def test_adaround_rounds_layer_by_layer_and_keeps_the_activation_steps():
    adaround = _reconstruction("adaround")
    assert adaround.unit == "layer" and not adaround.learn_steps and adaround.learn_rounding
    _, images, repq = quantized_test_vit("repq-vit", 4, 4)
    _, _, rounded = quantized_test_vit("adaround", 4, 4, reconstruct=make(ReconConfig, iterations=3, batch_size=2))
    fc1 = rounded.model.blocks[1].mlp.fc1
    assert torch.equal(fc1.weight_quantizer(fc1.weight), fc1.weight)
    assert not torch.equal(fc1.weight, repq.model.blocks[1].mlp.fc1.weight)
    for name, quantizer in repq.quantizers().items():
        if "weight" not in name and hasattr(quantizer, "scale"):
            assert torch.equal(quantizer.scale, rounded.quantizers()[name].scale), name


def test_qdrop_is_repq_vit_plus_reconstruction():
    """Same calibration as repq-vit, then weights move onto learned roundings (still on the grid)."""
    _, _, repq = quantized_test_vit("repq-vit", 4, 4)
    _, _, qdrop = quantized_test_vit("qdrop", 4, 4, reconstruct=make(ReconConfig, iterations=3, batch_size=2))
    fc1_repq, fc1_qdrop = repq.model.blocks[0].mlp.fc1, qdrop.model.blocks[0].mlp.fc1
    assert not torch.equal(fc1_repq.weight, fc1_qdrop.weight)
    assert torch.equal(fc1_qdrop.weight_quantizer(fc1_qdrop.weight), fc1_qdrop.weight)
    assert torch.equal(fc1_repq.weight_quantizer.scale, fc1_qdrop.weight_quantizer.scale)  # AdaRound keeps Δ


@pytest.mark.parametrize(("method", "options", "softmax", "target"), [
    ("is-vit", {}, "sulq", torch.mean),
    ("dopq-vit", {"smooth": True}, "tanq", lambda s: torch.quantile(s, 0.5)),
])
def test_smooth_optimization_three_stages(tmp_path, monkeypatch, method, options, softmax, target):
    """Stage 1 reconstructs activation steps only (float weights, per-channel post-LN inputs), stage 2 folds the
    learned steps to per tensor (I&S-ViT: their mean, DopQ-ViT: their median), stage 3 reconstructs weights too;
    the result saves and reloads exactly."""
    import vitq.methods.is_vit.smooth as smooth

    stages, learned = [], []
    original = smooth.reconstruct_model

    def record(qmodel, images, settings, **kwargs):
        qkv = qmodel.model.blocks[0].attn.qkv
        stages.append((settings.learn_rounding, qkv.weight_quantizer.enabled, qkv.input_quantizer.granularity))
        records = original(qmodel, images, settings, **kwargs)
        learned.append(qkv.input_quantizer.scale.detach().clone())
        return records

    monkeypatch.setattr(smooth, "reconstruct_model", record)
    tiny = make(ReconConfig, iterations=3, batch_size=2)
    _, images, qmodel = quantized_test_vit(method, 4, 4, reconstruct=tiny, **options)  # quantize runs the last one
    assert stages == [(False, False, "channel")]
    quantizers = qmodel.quantizers()
    assert quantizers["blocks.0.attn.softmax.quantizer"].kind == softmax
    qkv_input = quantizers["blocks.0.attn.qkv.input_quantizer"]
    assert qkv_input.scale.numel() == 1
    # the final reconstruction moved the folded step by at most 3 Adam steps of lr 4e-5
    assert float(qkv_input.scale) == pytest.approx(float(target(learned[0].double())), abs=3 * tiny.scale_lr + 1e-6)
    fc1 = qmodel.model.blocks[0].mlp.fc1
    assert torch.equal(fc1.weight_quantizer(fc1.weight), fc1.weight)  # hardened by the final reconstruction
    path = vitq.save(qmodel, tmp_path / f"{method}.safetensors")
    with torch.no_grad():
        assert torch.equal(vitq.load(path)(images), qmodel(images))


def test_dopq_smooth_needs_reconstruction_and_a_fixed_target():
    with pytest.raises(VitqError, match="--reconstruct"):
        quantized_test_vit("dopq-vit", 4, 4, smooth=True)
    with pytest.raises(VitqError, match="fixed target"):
        quantized_test_vit("dopq-vit", 4, 4, reconstruct=ReconConfig(iterations=1), smooth=True, target="search")


def test_uniform_softmax_and_head_ranges_for_the_attention_quantizers():
    recon = make(ReconConfig, iterations=3, batch_size=2)
    _, _, qmodel = quantized_test_vit("qdrop", 4, 4, reconstruct=recon, softmax="uniform", head_ranges=True)
    _, _, fixed = quantized_test_vit("qdrop", 4, 4, reconstruct=make(ReconConfig, iterations=3, batch_size=2,
                                                                     learn_steps=False),
                                     softmax="uniform", head_ranges=True)
    heads = qmodel.model.blocks[0].attn.num_heads
    for name in ("q", "k", "v", "softmax"):
        quantizer = getattr(qmodel.model.blocks[0].attn, name).quantizer
        assert quantizer.kind == "uniform" and quantizer.granularity == "channel" and quantizer.axis == 1, name
        assert quantizer.scale.numel() == heads, name
    # the uniform softmax's per-head steps are learned by the reconstruction (fixed without learn_steps)
    learned = qmodel.model.blocks[0].attn.softmax.quantizer.scale
    assert not torch.equal(learned, fixed.model.blocks[0].attn.softmax.quantizer.scale)
    _, _, plain = quantized_test_vit("qdrop", 4, 4, reconstruct=recon)
    assert plain.model.blocks[0].attn.softmax.quantizer.kind == "log_sqrt2"
    assert plain.model.blocks[0].attn.q.quantizer.granularity == "tensor"
    with pytest.raises(VitqError, match="softmax"):
        method_class("qdrop").parse_options({"softmax": "log2"})
    assert method_class("aphq-vit").parse_options({"head_ranges": True}).head_ranges  # aphq-vit has them too


def test_fpcs_initialises_the_ranges_by_the_layer_output_error_on_the_first_images(monkeypatch):
    """``fpcs=true``: every stage is reparameterized and then FPCS-searched, on the first FPCS_IMAGES images only;
    the weight ranges (which AdaRound keeps) are FPCS's, not the percentile search's."""
    import vitq.methods.brecq as brecq

    seen = []
    original = brecq.fpcs_stage

    def record(qmodel, stage, x, settings):
        seen.append((stage.name, x.shape[0]))
        original(qmodel, stage, x, settings)

    monkeypatch.setattr(brecq, "fpcs_stage", record)
    monkeypatch.setattr(brecq, "FPCS_IMAGES", 1)
    recon = make(ReconConfig, iterations=2, batch_size=2, learn_steps=False)
    _, _, searched = quantized_test_vit("qdrop", 3, 3, reconstruct=recon, fpcs=True, head_ranges=True)
    assert [name for name, _ in seen] == [stage.name for stage in searched.stages()]
    assert all(n == 1 for _, n in seen)
    _, _, plain = quantized_test_vit("qdrop", 3, 3, reconstruct=recon, head_ranges=True)
    fc1, plain_fc1 = searched.model.blocks[0].mlp.fc1, plain.model.blocks[0].mlp.fc1
    assert not torch.equal(fc1.weight_quantizer.scale, plain_fc1.weight_quantizer.scale)
    zero_points = fc1.weight_quantizer.zero_point
    assert torch.equal(zero_points, zero_points.round())  # FPCS's grid: integer zero points
    assert method_class("aphq-vit").parse_options({"fpcs": True}).fpcs


def test_wide_weight_ranges_search_the_wider_percentiles_for_every_weight():
    """``weight_ranges=wide``: every weight quantizer, the re-calibrated ones of the folded qkv/fc1 too, searches
    the wider percentiles (ranges that AdaRound then keeps); the default keeps RepQ-ViT's."""
    from vitq.quantizers.ranges import REPQ_PERCENTILES, WEIGHT_PERCENTILES

    recon = make(ReconConfig, iterations=2, batch_size=2, learn_steps=False)
    _, _, wide = quantized_test_vit("qdrop", 3, 3, reconstruct=recon, weight_ranges="wide")
    _, _, repq = quantized_test_vit("qdrop", 3, 3, reconstruct=recon)
    layers = [(name, layer, plain) for (name, layer), plain in zip(wide.named_modules(), repq.modules(), strict=True)
              if getattr(layer, "weight_quantizer", None) is not None]
    assert len(layers) > 4
    for name, layer, plain in layers:
        assert tuple(layer.weight_quantizer.search_percentiles) == WEIGHT_PERCENTILES, name
        assert tuple(plain.weight_quantizer.search_percentiles) == REPQ_PERCENTILES, name
    assert any(not torch.equal(layer.weight_quantizer.scale, plain.weight_quantizer.scale)
               for _, layer, plain in layers)
    with pytest.raises(VitqError, match="weight_ranges"):
        method_class("qdrop").parse_options({"weight_ranges": "minmax"})
    assert method_class("aphq-vit").parse_options({"weight_ranges": "wide"}).weight_ranges == "wide"


def test_per_head_ranges_are_the_ranges_of_each_head_alone():
    from vitq.quantizers import build_quantizer

    x = torch.randn(4, 3, 10, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.1, 1.0, 5.0])[:, None,
                                                                                                             None]
    per_head = build_quantizer({"kind": "uniform", "bits": 4, "granularity": "channel", "axis": 1, "init": "mse"})
    per_head.calibrate(x)
    for h in range(3):
        alone = build_quantizer({"kind": "uniform", "bits": 4, "init": "mse"})
        alone.calibrate(x[:, h])
        torch.testing.assert_close(per_head.scale[h], alone.scale.reshape(()))
        torch.testing.assert_close(per_head.zero_point[h], alone.zero_point.reshape(()))


def test_the_paper_preset_fills_in_the_budget_under_the_given_settings():
    from vitq.config import RECON_PRESETS

    paper = _reconstruction("qdrop", preset="paper", iterations=50)
    assert paper.iterations == 50  # given explicitly: wins over the preset
    assert (paper.batch_size, paper.weight_lr, paper.scale_schedule) == (32, 1e-3, "cosine")
    assert paper.drop_prob == 0.5  # the method's own default stays
    assert _reconstruction("qdrop", preset="paper").iterations == RECON_PRESETS["paper"]["iterations"]
    assert ReconConfig.model_validate(paper.model_dump()) == paper  # a saved config reads back the same
    assert "preset" not in ReconConfig().model_dump()  # older settings keep their key
    with pytest.raises(VitqError, match="invalid preset"):
        make(ReconConfig, preset="fast")


def test_drop_input_takes_the_methods_drop_probability():
    assert _reconstruction("qdrop", drop_input=True).drop_prob == 0.5  # qdrop's own default makes it valid
    assert _reconstruction("repq-vit", drop_input=True, drop_prob=0.3).drop_input
    with pytest.raises(VitqError, match="drop_input=true needs drop_prob > 0"):
        _reconstruction("brecq", drop_input=True)  # brecq drops nothing
