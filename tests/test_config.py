"""Tests of vitq.config: QuantConfig validation, make(), PointOverride parsing and spec_for."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import vitq
from vitq.config import PointOverride, QuantConfig, make
from vitq.errors import VitqError
from vitq.methods import method_class, method_names

WEIGHT = {"kind": "uniform", "bits": 4, "granularity": "channel", "axis": 0, "init": "minmax"}
ACT = {"kind": "uniform", "bits": 4, "granularity": "tensor", "init": "minmax"}


# ------------------------------------------------------------------ QuantConfig


def test_defaults_and_label():
    cfg = QuantConfig()
    assert cfg.method == "percentile" and cfg.w_bits == cfg.a_bits == cfg.image_bits == 8
    assert cfg.calib_size == 32 and cfg.overrides == [] and cfg.options == {}
    assert QuantConfig(method="minmax", w_bits=4, a_bits=6).label == "minmax W4A6"
    assert QuantConfig(method="float").label == "float"
    assert {"float", "minmax", "percentile"} <= set(method_names())


@pytest.mark.parametrize("field", ["w_bits", "a_bits", "image_bits"])
@pytest.mark.parametrize("bits", [1, 9, 0, -1, 32])
def test_bits_out_of_range(field, bits):
    with pytest.raises(ValidationError):
        QuantConfig(**{field: bits})
    with pytest.raises(VitqError, match=field):
        make(QuantConfig, **{field: bits})


@pytest.mark.parametrize("bits", [2, 8])
def test_bits_at_the_limits(bits):
    assert QuantConfig(w_bits=bits, a_bits=bits, image_bits=bits).w_bits == bits


@pytest.mark.parametrize("field", ["w_bits", "image_bits"])
def test_only_activations_take_the_weight_only_16(field):
    with pytest.raises(ValidationError):
        QuantConfig(**{field: 16})


def test_a16_is_weight_only_every_activation_float(float_model):
    config = QuantConfig(method="minmax", w_bits=4, a_bits=16,
                         overrides=[PointOverride(pattern="blocks.0.attn.qkv", bits=8)])
    assert config.weight_only and not QuantConfig(a_bits=8).weight_only and config.label == "minmax W4A16"
    qmodel = vitq.prepare(float_model, config)
    slots = qmodel.slots()
    assert all(s.quantizer is None for s in slots if s.role != "weight")  # the image input too; no override revives
    assert all(s.quantizer is not None and s.quantizer.bits == (8 if s.point == "blocks.0.attn.qkv" else 4)
               for s in slots if s.role == "weight")


def test_unknown_method():
    """The config is plain data (it imports no method); the name is checked when the method is built."""
    config = make(QuantConfig, method="gptq4")
    with pytest.raises(VitqError, match="unknown method 'gptq4'; known: .*minmax"):
        vitq.prepare(torch.nn.Linear(2, 2), config)


@pytest.mark.parametrize("kwargs, where", [
    ({"calib_size": 0}, "calib_size"),
    ({"calib_size": -3}, "calib_size"),
    ({"seed": -1}, "seed"),
    ({"wbits": 4}, "wbits"),  # typo of w_bits: extra="forbid"
    ({"options": 3}, "options"),
    ({"overrides": [{"pattern": "head", "bitz": 4}]}, "overrides.0.bitz"),
    ({"overrides": [{"pattern": "", "bits": 4}]}, "overrides.0.pattern"),
])
def test_invalid_fields(kwargs, where):
    with pytest.raises(ValidationError):
        QuantConfig(**kwargs)
    with pytest.raises(VitqError) as info:
        make(QuantConfig, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"invalid {where}:")
    assert "Value error, " not in message


def test_unknown_method_options_are_rejected_by_the_method():
    cfg = QuantConfig(method="minmax", options={"bogus": 1})  # options are method specific
    with pytest.raises(VitqError, match="has no option.*bogus"):
        method_class(cfg.method)(cfg)


def test_make_error_is_one_line():
    with pytest.raises(VitqError) as info:
        make(QuantConfig, method="nope", w_bits=1, calib_size=0)
    assert "\n" not in str(info.value) and str(info.value).startswith("invalid ")


def test_config_json_round_trip():
    cfg = QuantConfig(method="minmax", w_bits=4, a_bits=4, seed=3,
                      overrides=[PointOverride.parse("head=8"), PointOverride.parse("blocks.*.attn.softmax=float")])
    assert make(QuantConfig, **cfg.model_dump(mode="json")) == cfg


# ------------------------------------------------------------------ PointOverride.parse


@pytest.mark.parametrize("text, expected", [
    ("blocks.*.mlp.fc2=float", {"pattern": "blocks.*.mlp.fc2", "keep_float": True, "bits": None, "kind": None}),
    ("head=8", {"pattern": "head", "bits": 8, "kind": None, "keep_float": False}),
    ("blocks.0.attn.softmax=uniform:4", {"pattern": "blocks.0.attn.softmax", "kind": "uniform", "bits": 4}),
    ("x=uniform", {"pattern": "x", "kind": "uniform", "bits": None, "keep_float": False}),
    ("head=2", {"pattern": "head", "bits": 2}),
])
def test_parse(text, expected):
    override = PointOverride.parse(text)
    for key, value in expected.items():
        assert getattr(override, key) == value


@pytest.mark.parametrize("text, match", [
    ("head", "must look like"),
    ("=4", "must look like"),
    ("head=", "must look like"),
    ("head=99", "bits"),
    ("head=1", "bits"),
    ("head=nokind", "unknown quantizer kind 'nokind'"),
    ("head=uniform:9", "bits"),
    ("head=uniform:", "unknown quantizer kind"),
    ("head=nokind:4", "unknown quantizer kind 'nokind'"),
    ("head=\u00b2", "unknown quantizer kind"),  # superscript two: str.isdigit() but not int()
])
def test_parse_errors(text, match):
    with pytest.raises(VitqError, match=match):
        PointOverride.parse(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=12))
def test_parse_only_raises_vitq_error(text):
    try:
        override = PointOverride.parse(text)
    except VitqError as err:
        assert "\n" not in str(err)
    else:
        assert override.pattern and text.startswith(override.pattern + "=")


def test_override_is_frozen_and_strict():
    override = PointOverride.parse("head=8")
    with pytest.raises(ValidationError):
        override.bits = 4
    with pytest.raises(VitqError, match="kind"):
        make(PointOverride, pattern="head", kind="no_such_kind")


# ------------------------------------------------------------------ spec_for


def _cfg(*overrides: str) -> QuantConfig:
    return QuantConfig(method="minmax", w_bits=4, a_bits=4, overrides=[PointOverride.parse(o) for o in overrides])


def test_spec_for_without_overrides_is_identity():
    assert _cfg().spec_for("head", "head.weight_quantizer", WEIGHT) == WEIGHT
    assert _cfg().spec_for("head", "head.weight_quantizer", None) is None


def test_spec_for_point_pattern_hits_both_slots():
    cfg = _cfg("head=8")
    for slot, spec in (("head.weight_quantizer", WEIGHT), ("head.input_quantizer", ACT)):
        out = cfg.spec_for("head", slot, spec)
        assert out == {**spec, "bits": 8}
    assert cfg.spec_for("blocks.0.mlp.fc1", "blocks.0.mlp.fc1.input_quantizer", ACT) == ACT
    assert WEIGHT["bits"] == 4  # the input spec is not mutated


def test_spec_for_slot_pattern_hits_only_that_slot():
    cfg = _cfg("blocks.1.mlp.fc2.input_quantizer=8")
    point = "blocks.1.mlp.fc2"
    assert cfg.spec_for(point, f"{point}.input_quantizer", ACT)["bits"] == 8
    assert cfg.spec_for(point, f"{point}.weight_quantizer", WEIGHT) == WEIGHT
    assert cfg.spec_for("blocks.2.mlp.fc2", "blocks.2.mlp.fc2.input_quantizer", ACT) == ACT


def test_spec_for_glob_and_keep_float():
    cfg = _cfg("blocks.*.attn.softmax=float")
    assert cfg.spec_for("blocks.3.attn.softmax", "blocks.3.attn.softmax.quantizer", ACT) is None
    assert cfg.spec_for("blocks.3.attn.proj", "blocks.3.attn.proj.input_quantizer", ACT) == ACT


def test_spec_for_applies_overrides_in_order():
    cfg = _cfg("blocks.*=6", "blocks.1.*=3")
    assert cfg.spec_for("blocks.1.mlp.fc1", "blocks.1.mlp.fc1.weight_quantizer", WEIGHT)["bits"] == 3
    assert cfg.spec_for("blocks.2.mlp.fc1", "blocks.2.mlp.fc1.weight_quantizer", WEIGHT)["bits"] == 6
    assert _cfg("blocks.1.*=3", "blocks.*=6").spec_for(
        "blocks.1.mlp.fc1", "blocks.1.mlp.fc1.weight_quantizer", WEIGHT)["bits"] == 6
    # float wins over anything before it, and a float slot stays float
    assert _cfg("head=8", "head=float").spec_for("head", "head.weight_quantizer", WEIGHT) is None
    assert _cfg("head=float", "head=8").spec_for("head", "head.weight_quantizer", WEIGHT) is None


def test_spec_for_kind_override_keeps_options():
    out = _cfg("head=uniform:3").spec_for("head", "head.weight_quantizer", WEIGHT)
    assert out == {**WEIGHT, "bits": 3}
