"""Tests of the transformers DINOv2 (with and without registers) and SigLIP layouts of vitq.models.hf: the timm model
computes what transformers computes (its SDPA and eager attention; DINOv2's position embedding resampled from the
config's grid to the processor's crop), quantization keeps the softmax quantizer on the path, save/load, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_saves_and_loads_bit_identically, random_images, sqnr_to_float

import vitq
from vitq.errors import VitqError
from vitq.models.registry import create_model

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
SIGLIP_VISION = {**SMALL, "image_size": 32, "intermediate_size": 64}
#: DINOv2 configs say 48 px (a 6x6 patch grid) while their processor crops 32 px (4x4): the embedding is resampled
CONFIGS = {
    "Dinov2Model": lambda: transformers.Dinov2Config(**SMALL, image_size=48),
    "Dinov2ForImageClassification": lambda: transformers.Dinov2Config(**SMALL, image_size=48, use_swiglu_ffn=True,
                                                                      num_labels=5),
    "Dinov2WithRegistersModel": lambda: transformers.Dinov2WithRegistersConfig(**SMALL, image_size=48,
                                                                               num_register_tokens=2),
    "Dinov2WithRegistersForImageClassification": lambda: transformers.Dinov2WithRegistersConfig(
        **SMALL, image_size=48, num_register_tokens=2, num_labels=5),
    "SiglipVisionModel": lambda: transformers.SiglipVisionConfig(**SIGLIP_VISION),
    "SiglipModel": lambda: transformers.SiglipConfig(vision_config=SIGLIP_VISION, text_config=TEXT),
}


def _reference(folder, attention: str, x: torch.Tensor) -> torch.Tensor:
    """transformers' own output of ``folder``'s model: the logits, else the pooled output (a whole SigLIP model's
    image features)."""
    config = transformers.AutoConfig.from_pretrained(folder)
    model = getattr(transformers, config.architectures[0]).from_pretrained(folder, attn_implementation=attention)
    model.eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=x) if config.model_type == "siglip" else model(pixel_values=x)
    if torch.is_tensor(out):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.pooler_output


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A small random transformers checkpoint per architecture (seeded; every tensor perturbed, so no bias is zero
    and no gain one and a misplaced tensor shows), saved by transformers, DINOv2's with a 32 px processor."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = getattr(transformers, name)(config()).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        folders[name] = root / name
        model.save_pretrained(folders[name])
        if name.startswith("Dinov2"):
            transformers.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}) \
                .save_pretrained(folders[name])
    return folders


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("architecture", list(CONFIGS))
@torch.no_grad()
def test_read_model_computes_what_transformers_computes(hf_folders, architecture):
    model = create_model(f"hf:{hf_folders[architecture]}")
    x = _images()
    ours = model(x)
    for attention in ("sdpa", "eager"):
        reference = _reference(hf_folders[architecture], attention, x)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert model.pretrained_cfg["architecture"] == architecture
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.patch_embed.img_size == (32, 32)


@torch.no_grad()
def test_dinov2_without_a_processor_runs_at_its_config_size(hf_folders, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_folders["Dinov2Model"] / name, tmp_path / name)
    model = create_model(f"hf:{tmp_path}")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    reference = _reference(tmp_path, "sdpa", x)
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert model.pretrained_cfg["input_size"] == (3, 48, 48)


@torch.no_grad()
def test_a_siglip_config_without_the_vision_defaults_reads_the_same(hf_folders, tmp_path):
    """Hub configs of whole SigLIP models write only what differs from the vision config's defaults."""
    folder = hf_folders["SiglipModel"]
    config = json.loads((folder / "config.json").read_text())
    for key in ("hidden_act", "layer_norm_eps", "num_channels", "vision_use_head"):
        del config["vision_config"][key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    assert torch.equal(create_model(f"hf:{tmp_path}")(_images()), create_model(f"hf:{folder}")(_images()))


@pytest.mark.parametrize("architecture", ["Dinov2ForImageClassification", "SiglipVisionModel"])
@torch.no_grad()
def test_quantized_model_keeps_its_softmax_quantizer_on_the_path(hf_folders, architecture):
    model = create_model(f"hf:{hf_folders[architecture]}")
    images = random_images(4, size=32)
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="percentile", w_bits=8, a_bits=8, calib_size=4), images,
                           progress=False)
    slots = {slot.name: slot.quantizer for slot in qmodel.slots()}
    assert {"blocks.1.attn.softmax.quantizer", "blocks.0.attn.qkv.weight_quantizer",
            "blocks.1.mlp.fc2.weight_quantizer"} <= set(slots)
    assert ("head.weight_quantizer" in slots) == architecture.endswith("Classification")
    assert not any(q for name, q in slots.items() if name.startswith("attn_pool"))  # SigLIP's pooling stays float
    assert sqnr_to_float(qmodel, images) > 20  # W8A8 on a random model: the output stays close to float
    quantized = qmodel(images)
    for slot in qmodel.slots():
        if slot.point.endswith("attn.softmax"):
            slot.quantizer.enabled = False
    assert not torch.equal(qmodel(images), quantized)  # SDPA would leave it unchanged


@pytest.mark.parametrize("architecture", ["Dinov2WithRegistersForImageClassification", "SiglipModel"])
def test_save_and_load_bit_identically(hf_folders, architecture, tmp_path):
    name = f"hf:{hf_folders[architecture]}"
    assert_saves_and_loads_bit_identically(name, tmp_path)


def _variant(tmp_path, source, config_changes: dict, drop: str | None = None) -> str:
    """``hf:`` a copy of the ``source`` folder, its config updated and, with ``drop``, a tensor left out."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / f"variant{len(list(tmp_path.iterdir()))}"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    if drop is not None:
        tensors = load_file(str(folder / "model.safetensors"))
        del tensors[drop]
        save_file(tensors, str(folder / "model.safetensors"))
    return f"hf:{folder}"


@pytest.mark.parametrize(("architecture", "changes", "drop", "message"), [
    ("Dinov2Model", {"architectures": ["Dinov2Backbone"]}, None,
     "Dinov2Backbone is not supported; vitq reads Dinov2ForImageClassification, Dinov2Model"),
    ("SiglipModel", {"architectures": ["SiglipForImageClassification"]}, None,
     "SiglipForImageClassification is not supported; vitq reads SiglipModel"),
    ("SiglipVisionModel", {"vision_use_head": False}, None, "without its attention pooling head"),
    ("SiglipModel", {"vision_config": "x"}, None, "'vision_config' must be an object"),
    ("Dinov2Model", {"mlp_ratio": "4"}, None, "'mlp_ratio' must be a positive number"),
    ("Dinov2Model", {"image_size": 56}, None, "the position embedding has 37 entries, the config's 7x7 patch grid"),
    ("Dinov2Model", {}, "encoder.layer.1.layer_scale2.lambda1", "no tensor 'encoder.layer.1.layer_scale2.lambda1'"),
    ("SiglipVisionModel", {}, "head.attention.in_proj_weight", "no tensor 'head.attention.in_proj_weight'"),
])
def test_bad_inputs_are_one_line_errors(hf_folders, tmp_path, architecture, changes, drop, message):
    with pytest.raises(VitqError, match=message) as error:
        create_model(_variant(tmp_path, hf_folders[architecture], changes, drop))
    assert "\n" not in str(error.value)
