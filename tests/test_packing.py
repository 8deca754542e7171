"""Bit packing of weight codes and packed checkpoints (issue 6, part 3)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vitq
from vitq.errors import VitqError
from vitq.export.checkpoint import HEADER_KEY, PACKED_SUFFIX, read_header
from vitq.export.packing import pack_codes, packed_size, unpack_codes

timm = pytest.importorskip("timm")

MODEL = "test_vit"


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """The documented layout, one bit at a time: code i's bit j is stream bit i·bits + j, LSB first."""
    stream = [(code >> j) & 1 for code in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[k + j] << j for j in range(8)) for k in range(0, len(stream), 8))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), bits=st.integers(1, 8))
def test_pack_matches_the_bit_by_bit_reference_and_round_trips(data, bits):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=70))
    packed = pack_codes(torch.tensor(codes, dtype=torch.int32), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(len(codes), bits)
    assert bytes(packed.tolist()) == _reference_pack(codes, bits)
    assert unpack_codes(packed, bits, len(codes)).tolist() == codes


def test_pack_layout_examples():
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_codes(torch.tensor([7, 0, 5]), 3).tolist() == [0b01000111, 0b1]
    assert pack_codes(torch.tensor([200, 3]), 8).tolist() == [200, 3]


@pytest.mark.parametrize(("codes", "bits", "match"), [
    ([0, 16], 4, r"\[0, 16\)"), ([-1], 4, r"\[0, 16\)"), ([0], 9, "1..8"), ([0], 0, "1..8"),
])
def test_pack_rejects_bad_input(codes, bits, match):
    with pytest.raises(VitqError, match=match):
        pack_codes(torch.tensor(codes), bits)


def test_unpack_rejects_a_wrong_length():
    with pytest.raises(VitqError, match="cannot hold exactly 5 codes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 5)


# ----------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval()
    return model, torch.randn(2, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("method", "bits", "options"), [
    ("minmax", 2, {}), ("minmax", 3, {}), ("percentile", 4, {}), ("minmax", 8, {}),
    ("gptq", 3, {"group_size": 16}), ("erq", 4, {"dual_uniform": True}),
])
def test_packed_checkpoint_reloads_bit_for_bit_and_is_smaller(tmp_path, model_and_images, method, bits, options):
    model, images = model_and_images
    config = vitq.QuantConfig(method=method, w_bits=bits, a_bits=8, calib_size=2, options=options)
    qmodel = vitq.quantize(model, config, images, model_name=MODEL, progress=False)
    packed = vitq.save(qmodel, tmp_path / "packed.safetensors")
    plain = vitq.save(qmodel, tmp_path / "plain.safetensors", packed=False)
    with torch.no_grad():
        expected = qmodel(images)
        assert torch.equal(vitq.load(packed)(images), expected)
        assert torch.equal(vitq.load(plain)(images), expected)
    entries = read_header(packed)["packed"]
    weights = {f"{n}.weight" for n, p in qmodel.points().items() if getattr(p, "weight_quantizer", None)}
    assert set(entries) == weights and {e["bits"] for e in entries.values()} == {bits}
    stored = load_file(str(packed))
    for key, entry in entries.items():
        assert key not in stored
        count = torch.Size(entry["shape"]).numel()
        assert stored[key + PACKED_SUFFIX].numel() == packed_size(count, bits)
    assert packed.stat().st_size < plain.stat().st_size


def _rewrite_header(src, dst, change):
    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
    change(header)
    save_file(load_file(str(src)), str(dst), metadata={HEADER_KEY: json.dumps(header)})
    return dst


@pytest.mark.parametrize("change", [
    lambda h: h.update(packed=[1]),
    lambda h: h["packed"].update({"head.weight": {"bits": "x"}}),
    lambda h: h["packed"].update({"nothing.weight": next(iter(h["packed"].values()))}),
    lambda h: next(iter(h["packed"].values())).update(bits=2),
])
def test_broken_packed_entries_are_one_line_errors(tmp_path, model_and_images, change):
    model, images = model_and_images
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="minmax", w_bits=4, a_bits=8, calib_size=2), images,
                           model_name=MODEL, progress=False)
    src = vitq.save(qmodel, tmp_path / "q.safetensors")
    with pytest.raises(VitqError) as err:
        vitq.load(_rewrite_header(src, tmp_path / "bad.safetensors", change))
    assert "\n" not in str(err.value)
