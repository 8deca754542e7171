"""Tests of vitq.export.checkpoint (save/load of quantized models) and vitq.models.create_model."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import random_images
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vitq
from vitq.errors import VitqError
from vitq.export.checkpoint import HEADER_KEY, read_header

#: timm's own tiny test ViT (dim 64, 160x160 input): stock, so ``timm.create_model(MODEL)`` rebuilds it
MODEL = "test_vit"
OTHER = "test_vit3"  # another ViT with other widths


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return random_images(3)


@pytest.fixture(scope="module")
def qmodel(float_model, images) -> vitq.QuantizedModel:
    config = vitq.QuantConfig(
        method="minmax", w_bits=4, a_bits=4, calib_size=2,
        overrides=[vitq.PointOverride.parse(o) for o in
                   ("head=8", "blocks.*.attn.softmax=float", "blocks.1.mlp.fc2.input_quantizer=uniform:6")])
    return vitq.quantize(float_model, config, images[:2], model_name=MODEL, progress=False)


@pytest.fixture(scope="module")
def saved(qmodel, tmp_path_factory):
    return vitq.save(qmodel, tmp_path_factory.mktemp("ckpt") / "sub" / "q.safetensors")


def _rewrite(src, dst, *, header=None, state=None, raw_header=None):
    """Copy a vitq checkpoint with a changed header and/or state dict."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(src)) if state is None else state
    if raw_header is not None:
        metadata = {HEADER_KEY: raw_header}
    elif header is not None:
        metadata = {HEADER_KEY: json.dumps(header)}
    save_file(tensors, str(dst), metadata=metadata)
    return dst


# ------------------------------------------------------------------ round trip


def test_quantized_model_is_really_quantized(qmodel, float_model, images):
    specs = qmodel.quant_specs()
    assert specs["head.weight_quantizer"]["bits"] == 8 and specs["head.input_quantizer"]["bits"] == 8
    assert specs["blocks.0.attn.softmax.quantizer"] is None
    assert specs["blocks.1.mlp.fc2.input_quantizer"]["bits"] == 6
    assert specs["blocks.1.mlp.fc2.weight_quantizer"]["bits"] == 4
    assert specs["blocks.0.mlp.fc2.input_quantizer"]["bits"] == 4
    assert all(q.is_calibrated for q in qmodel.quantizers().values())
    with torch.no_grad():
        assert not torch.equal(qmodel(images), float_model(images))


def test_save_load_round_trip_is_bit_identical(qmodel, saved, images):
    assert saved.is_file() and saved.name == "q.safetensors"
    loaded = vitq.load(saved)
    assert isinstance(loaded, vitq.QuantizedModel) and not loaded.training
    assert loaded.model_name == MODEL and loaded.family == qmodel.family
    assert loaded.config == qmodel.config
    assert loaded.quant_specs() == qmodel.quant_specs()
    with torch.no_grad():
        assert torch.equal(loaded(images), qmodel(images))
    for name, q in qmodel.quantizers().items():
        other = loaded.quantizers()[name]
        assert torch.equal(other.scale, q.scale) and torch.equal(other.zero_point, q.zero_point)


def test_version_1_files_without_packing_still_load(qmodel, tmp_path, images):
    plain = vitq.save(qmodel, tmp_path / "plain.safetensors", packed=False)
    header = read_header(plain)
    del header["packed"]
    header["format_version"] = 1
    old = _rewrite(plain, tmp_path / "v1.safetensors", header=header)
    with torch.no_grad():
        assert torch.equal(vitq.load(old)(images), qmodel(images))


def test_files_without_layernorm_slots_still_load(qmodel, saved, tmp_path, images):
    """Files written before LayerNorm inputs became quantization points have no entry for them: float."""
    header = read_header(saved)
    specs = {k: v for k, v in header["quantizers"].items() if ".norm" not in k and not k.startswith("norm.")}
    assert len(specs) < len(header["quantizers"])
    old = _rewrite(saved, tmp_path / "old.safetensors", header={**header, "quantizers": specs})
    with torch.no_grad():
        assert torch.equal(vitq.load(old)(images), qmodel(images))


def test_header_contents(qmodel, saved):
    header = read_header(saved)
    assert header["format"] == "vitq-fakequant" and header["format_version"] == 2
    assert header["vitq_version"] == vitq.__version__
    assert header["model_name"] == MODEL and header["family"] == "vit"
    assert header["config"]["overrides"][0] == {"pattern": "head", "bits": 8, "kind": None, "keep_float": False}
    assert header["quantizers"] == qmodel.quant_specs()


def test_load_never_unpickles(saved, monkeypatch, images, qmodel):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = vitq.load(str(saved))  # a str path works too
    with torch.no_grad():
        assert torch.equal(loaded(images[:1]), qmodel(images[:1]))
    with open(saved, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        json.loads(f.read(header_len))  # the file is plain safetensors: length + JSON + raw tensors


# ------------------------------------------------------------------ load errors


def _load_error(path) -> str:
    with pytest.raises(VitqError) as info:
        vitq.load(path)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message
    return message


def test_load_missing_file(tmp_path):
    assert "not found" in _load_error(tmp_path / "nope.safetensors")


def test_load_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(os.urandom(4096))
    assert "safetensors" in _load_error(path)


def test_load_empty_and_tiny_files(tmp_path):
    for name, data in (("empty.safetensors", b""), ("float.safetensors", b"\x01\x02")):
        path = tmp_path / name
        path.write_bytes(data)
        _load_error(path)


def test_load_pickle_file(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    _load_error(path)


def test_load_plain_safetensors_without_header(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    assert "not a vitq quantized model" in _load_error(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"other": "x"})
    assert "not a vitq quantized model" in _load_error(path)


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"text"', json.dumps({"format": "other"}),
                                 json.dumps({"format": "vitq-fakequant", "format_version": 99})])
def test_load_bad_header(saved, tmp_path, raw):
    _load_error(_rewrite(saved, tmp_path / "bad.safetensors", raw_header=raw))


def test_load_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 20):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        _load_error(path)


def test_load_corrupt_header_bytes(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[12:40] = b"\xff" * 28  # inside the JSON header
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    _load_error(path)


@pytest.mark.parametrize("key", ["model_name", "family", "config", "quantizers"])
def test_load_header_missing_field(saved, tmp_path, key):
    header = read_header(saved)
    del header[key]
    assert key in _load_error(_rewrite(saved, tmp_path / "missing.safetensors", header=header))


def test_load_header_for_another_architecture(saved, tmp_path):
    header = read_header(saved)
    header["model_name"] = OTHER  # a deeper, wider ViT: other slots and tensor shapes
    assert "does not match" in _load_error(_rewrite(saved, tmp_path / "other.safetensors", header=header))


def test_load_header_unknown_model_and_family(saved, tmp_path):
    header = read_header(saved)
    _load_error(_rewrite(saved, tmp_path / "m.safetensors", header={**header, "model_name": "no_such_vit"}))
    _load_error(_rewrite(saved, tmp_path / "f.safetensors", header={**header, "family": "cnn"}))
    _load_error(_rewrite(saved, tmp_path / "c.safetensors", header={**header, "config": {"method": "nope"}}))


def test_load_header_quantizer_entries_do_not_match(saved, tmp_path):
    header = read_header(saved)
    specs = dict(header["quantizers"])
    del specs["blocks.0.mlp.fc1.weight_quantizer"]
    message = _load_error(_rewrite(saved, tmp_path / "a.safetensors", header={**header, "quantizers": specs}))
    assert "does not match" in message and "blocks.0.mlp.fc1.weight_quantizer" in message
    specs = {**header["quantizers"], "blocks.9.mlp.fc1.weight_quantizer": None}
    assert "does not match" in _load_error(
        _rewrite(saved, tmp_path / "b.safetensors", header={**header, "quantizers": specs}))
    specs = {**header["quantizers"], "head.weight_quantizer": {"kind": "no_such_kind", "bits": 4}}
    bad_kind = _rewrite(saved, tmp_path / "c.safetensors", header={**header, "quantizers": specs})
    assert "no_such_kind" in _load_error(bad_kind)
    specs = {**header["quantizers"], "head.weight_quantizer": None}  # a float slot: its buffers are unexpected
    assert "does not match" in _load_error(
        _rewrite(saved, tmp_path / "d.safetensors", header={**header, "quantizers": specs}))


def test_load_tensors_do_not_match_header(saved, tmp_path):
    state = load_file(str(saved))
    missing = {k: v for k, v in state.items() if k != "blocks.0.mlp.fc1.weight_quantizer.scale"}
    assert "does not match" in _load_error(_rewrite(saved, tmp_path / "a.safetensors", state=missing))
    extra = {**state, "bogus.weight": torch.zeros(1)}
    assert "does not match" in _load_error(_rewrite(saved, tmp_path / "b.safetensors", state=extra))
    wrong = {**state, "head.weight": torch.zeros(3, 3)}
    assert "does not match" in _load_error(_rewrite(saved, tmp_path / "c.safetensors", state=wrong))


# ------------------------------------------------------------------ create_model


def test_create_model_unknown_name_suggests_close_match():
    with pytest.raises(VitqError, match="unknown model 'deit_tiny_patch16_22'.*deit_tiny_patch16_224"):
        vitq.create_model("deit_tiny_patch16_22")


def test_create_model_from_local_checkpoint(float_model, tmp_path, images):
    path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(path))
    model = vitq.create_model(MODEL, checkpoint=path)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(images[:1]), float_model(images[:1]))


def test_create_model_wrong_architecture(float_model, tmp_path):
    path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(path))
    with pytest.raises(VitqError, match="does not match"):
        vitq.create_model(OTHER, checkpoint=path)


def test_create_model_rejects_pth_and_missing(float_model, tmp_path):
    path = tmp_path / "float.pth"
    torch.save(float_model.state_dict(), path)
    with pytest.raises(VitqError, match=r"\.safetensors"):
        vitq.create_model(MODEL, checkpoint=path)
    with pytest.raises(VitqError, match="not found"):
        vitq.create_model(MODEL, checkpoint=tmp_path / "missing.safetensors")


# ------------------------------------------------------------ files written by vitq 0.1.0 before the layout change
SAVED_0_1_0 = Path(__file__).parent / "data" / "checkpoints_0.1.0"


@pytest.mark.parametrize("name", ["percentile_w4a4", "adalog_w4a4", "ptq4vit_w6a6"])
def test_checkpoints_saved_before_the_layout_change_still_load(name, tmp_path):
    """Packed test_vit models (uniform, AdaLog and twin uniform quantizers) saved by the code before the package
    layout changed: saving the loaded model writes the very same bytes (same header, same packed tensors), and its
    logits are those that code computed, both in float64 (where a sum reassociated by another CPU cannot move an
    activation across a rounding boundary, see the folder's README)."""
    from safetensors.torch import load_file

    old = SAVED_0_1_0 / f"test_vit_{name}.safetensors"
    qmodel = vitq.load(old)
    assert vitq.save(qmodel, tmp_path / "again.safetensors").read_bytes() == old.read_bytes()
    with torch.no_grad():
        logits = qmodel.double()(random_images(4).double())
    expected = load_file(str(SAVED_0_1_0 / "expected_logits.safetensors"))[name]
    assert expected.dtype == torch.float64
    assert (logits - expected).abs().max() < 1e-9 * expected.abs().mean()
