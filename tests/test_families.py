"""The same checks for every timm family beyond ViT/DeiT and Swin v1, on small random-initialised configs.

For each family: the wrapped float model computes what timm computes (non-fused attention), its stages compose
to the forward and own every point once, the ``softmax`` point is on the path, every ``norm_linear_pairs``
LayerNorm output is its Linear's whole input (up to a permutation of tokens, the condition of the RepQ-style
fold), ``percentile`` W8A8 stays close to float, save → load is bit-identical, and every method either runs or
refuses with one clear line.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitq
from vitq import PointOverride, QuantConfig
from vitq.config import ReconConfig
from vitq.errors import VitqError
from vitq.methods import method_class, method_names
from vitq.models.smoke import SMOKE_OPTIONS, build_smoke_model, smoke_configs, smoke_images

#: the families checked here (the ViT and Swin v1 variants have their own tests in test_models.py)
FAMILIES = {key: config for key, config in smoke_configs().items()
            if key not in ("vit", "deit_distilled", "deit3", "dinov2", "clip", "siglip", "swin")}

#: families without a LayerNorm → Linear fold pair by design (the adapter docstring says why)
NO_FOLD_PAIRS: set[str] = {"levit", "swinv2", "mobilevitv2", "efficientvit_msra", "efficientvit_mit"}

#: relative max |logit difference| accepted between the wrapped float model and timm
TOL = 1e-5
#: ``percentile`` W8A8 logit SQNR floor on random weights (ViT/Swin measure 33-40 dB)
SQNR_FLOOR_DB = 25.0
#: families whose smoke config measures below it, with their own floor: EfficientViT MIT measures 19-22 dB over
#: seeds (20.7 with seed 0): many short BatchNorm-normalised conv layers, and the per-tensor quantizer of the
#: linear attention's kᵀv product, whose heads differ in scale (tests/test_family_efficientvit_mit.py)
SQNR_FLOORS_DB: dict[str, float] = {"efficientvit_mit": 17.0}


def build(family: str) -> nn.Module:
    return build_smoke_model(FAMILIES[family])


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """``(family, float model, images)``."""
    model = build(request.param)
    return request.param, model, smoke_images(model)


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def _sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.square().mean() / (out - ref).square().mean().clamp_min(1e-30)))


@torch.no_grad()
def test_wrap_keeps_the_float_function(family):
    _, model, x = family
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    assert _rel_diff(qmodel(x), model(x)) <= TOL


@torch.no_grad()
def test_stages_compose_to_forward(family):
    _, model, x = family
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    stages = qmodel.stages()
    out = x
    for stage in stages:
        out = stage.run(out)
    assert torch.equal(out, qmodel(x))
    for point in qmodel.points():
        owners = [s.name for s in stages if s.contains(point)]
        assert len(owners) == 1, (point, owners)


@torch.no_grad()
def test_softmax_point_is_on_the_path(family):
    """A 2-bit quantizer on one softmax point, alone enabled, sees probabilities and changes the logits."""
    name, model, x = family
    point = FAMILIES[name].softmax_point
    if point is None:
        pytest.skip(f"{name} has no softmax (its family test checks its attention points)")
    config = QuantConfig(method="minmax", overrides=[PointOverride(pattern=point, bits=2)])
    qmodel = vitq.prepare(model, config)
    softmax = qmodel.model.get_submodule(point)
    seen = []
    handle = softmax.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        with qmodel.quantization_disabled():
            float_out = qmodel(x)
            softmax.quantizer.enabled = True
            softmax.quantizer.calibrating = True  # calibrates on this forward, then quantizes
            quant_out = qmodel(x)
    finally:
        handle.remove()
    assert len(seen) == 2
    assert torch.allclose(seen[0].sum(-1), torch.ones(()), atol=1e-5)
    assert _rel_diff(quant_out, float_out) > 1e-4


@torch.no_grad()
def test_norm_linear_pairs_feed_their_linear(family):
    """Each listed LayerNorm's output is its Linear's input as a multiset of token rows (tokens may be permuted,
    e.g. into windows), so a per-channel affine map of it folds into the Linear exactly."""
    _, model, x = family
    qmodel = vitq.prepare(model, QuantConfig(method="float"))
    pairs = qmodel.norm_linear_pairs()
    assert bool(pairs) != (family[0] in NO_FOLD_PAIRS)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for norm, linear in pairs:
        handles.append(qmodel.model.get_submodule(norm).register_forward_hook(
            lambda m, a, out, key=norm: seen.__setitem__(key, out)))
        handles.append(qmodel.model.get_submodule(linear).register_forward_hook(
            lambda m, a, out, key=linear: seen.__setitem__(key, a[0])))
    try:
        qmodel(x)
    finally:
        for handle in handles:
            handle.remove()

    def rows(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        return flat[torch.argsort(flat[:, 0])]

    for norm, linear in pairs:
        assert torch.equal(rows(seen[norm]), rows(seen[linear])), (norm, linear)


@pytest.fixture(scope="module")
def percentile(family):
    name, model, x = family
    return vitq.quantize(model, QuantConfig(method="percentile", w_bits=8, a_bits=8, calib_size=2), x,
                         model_name=FAMILIES[name].timm_name, progress=False)


@torch.no_grad()
def test_percentile_w8a8_is_close_to_float(family, percentile):
    name, model, x = family
    assert _sqnr_db(percentile(x), model(x)) >= SQNR_FLOORS_DB.get(name, SQNR_FLOOR_DB)


@torch.no_grad()
def test_save_load_is_bit_identical(family, percentile, tmp_path, monkeypatch):
    """The file names the full timm model; the loader is pointed at the small config it was made from."""
    import vitq.export.checkpoint as checkpoint

    name, _, x = family
    small = copy.deepcopy(build(name))
    monkeypatch.setattr(checkpoint, "create_architecture",
                        lambda model_name, device=None: copy.deepcopy(small).to(device or "cpu"))
    path = vitq.save(percentile, tmp_path / "q.safetensors")
    assert torch.equal(vitq.load(path)(x), percentile(x))


RECON = ReconConfig(iterations=2, batch_size=2)
#: run at W4A4 (the headline settings; llm-fp4's 4-bit format search tries 3 formats, its 8-bit one 7)
W4A4_METHODS = ("repq-vit", "gptq", "erq", "llm-fp4")
#: family -> the methods that refuse it (with one line); every other method must run
REFUSALS: dict[str, set[str]] = {}


@pytest.mark.parametrize("method", [m for m in method_names() if m != "float"])
@torch.no_grad()
def test_every_method_runs_or_refuses_in_one_line(family, method):
    name, model, x = family
    bits = 4 if method in W4A4_METHODS else 8
    config = QuantConfig(method=method, w_bits=bits, a_bits=bits, calib_size=2, options=SMOKE_OPTIONS.get(method, {}),
                         reconstruct=RECON if method_class(method).reconstructs else None)
    try:
        with torch.enable_grad():
            qmodel = vitq.quantize(model, config, x, model_name=FAMILIES[name].timm_name, progress=False)
    except VitqError as err:
        assert method in REFUSALS.get(name, set()), f"{method} refuses {name}: {err}"
        assert "\n" not in str(err) and str(err)
        return
    assert method not in REFUSALS.get(name, set()), f"{method} no longer refuses {name}"
    assert torch.isfinite(qmodel(x)).all()
