"""Tests of vitq.models.hf.swin: transformers Swin checkpoints read into timm's ``SwinTransformer``, checked against
transformers itself (its SDPA and eager attention), quantization with the softmax quantizer on the path, save/load
and the refused configs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_saves_and_loads_bit_identically, random_images, randomize_norms, sqnr_to_float

import vitq
from vitq.errors import VitqError
from vitq.models.registry import create_model

transformers = pytest.importorskip("transformers")

ARCHITECTURES = ["SwinForImageClassification", "SwinModel"]
#: "shifted": 16x16 then 8x8 tokens in 4x4 windows (every second block shifts them), a LayerNorm eps that
#: transformers' patch embedding and merging norms ignore; "three_stages": a second patch merging, a last stage of
#: one window, no q/k/v bias and another activation
CONFIGS = {
    "shifted": {"image_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": [2, 2],
                "num_heads": [1, 2], "layer_norm_eps": 1e-6},
    "three_stages": {"image_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 8, "depths": [2, 2, 1],
                     "num_heads": [1, 2, 2], "mlp_ratio": 2.0, "qkv_bias": False, "hidden_act": "gelu_pytorch_tanh"},
}


def _random_swin(architecture: str, config: dict, seed: int):
    """transformers' model with random LayerNorms and relative position biases (its init leaves them 1, 0 and 0,
    which would hide a misplaced tensor) and unit-gain Linear layers (its small ones would hide the activation);
    the patch embedding keeps its small init, so its LayerNorm's eps shows."""
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(transformers.SwinConfig(**config, num_labels=7))
    randomize_norms(model, seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=module.in_features ** -0.5)
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def swin_folders(tmp_path_factory):
    """A small random transformers Swin checkpoint per (config, architecture), saved by transformers."""
    root = tmp_path_factory.mktemp("hf_swin")
    folders = {}
    for i, (config_name, config) in enumerate(CONFIGS.items()):
        for architecture in ARCHITECTURES:
            folders[config_name, architecture] = root / f"{config_name}-{architecture}"
            _random_swin(architecture, config, i).save_pretrained(folders[config_name, architecture])
    return folders


def _reference(folder, attention: str, x: torch.Tensor) -> torch.Tensor:
    """transformers' logits, or the pooled features of a ``SwinModel``."""
    config = transformers.AutoConfig.from_pretrained(folder)
    model = getattr(transformers, config.architectures[0]).from_pretrained(folder, attn_implementation=attention)
    result = model.eval()(pixel_values=x)
    return result.logits if hasattr(result, "logits") else result.pooler_output


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_read_swin_computes_what_transformers_computes(swin_folders, config_name, architecture, attention):
    model = create_model(f"hf:{swin_folders[config_name, architecture]}")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = _reference(swin_folders[config_name, architecture], attention, x)
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert model.pretrained_cfg["architecture"] == architecture
    assert model.num_classes == (7 if architecture == "SwinForImageClassification" else 0)


def test_the_shifted_config_shifts_its_windows_and_keeps_transformers_eps(swin_folders):
    model = create_model(f"hf:{swin_folders['shifted', 'SwinModel']}")
    shifts = [tuple(block.shift_size) for layer in model.layers for block in layer.blocks]
    assert shifts == [(0, 0), (2, 2), (0, 0), (2, 2)]
    assert model.layers[1].blocks[1].attn_mask is not None
    # the patch merging LayerNorm ignores layer_norm_eps in transformers too (its inputs here are too large for
    # the eps to show in the outputs)
    assert model.layers[1].downsample.norm.eps == model.patch_embed.norm.eps == 1e-5
    assert model.layers[1].blocks[0].norm1.eps == model.norm.eps == 1e-6


@torch.no_grad()
def test_quantized_swin_has_its_softmax_quantizer_on_the_path(swin_folders):
    model = create_model(f"hf:{swin_folders['shifted', 'SwinForImageClassification']}")
    images = random_images(4, size=32)
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="percentile", calib_size=4), images, progress=False)
    slots = {slot.name for slot in qmodel.slots()}
    assert {"layers.0.blocks.1.attn.softmax.quantizer", "layers.1.blocks.0.attn.qkv.weight_quantizer",
            "layers.1.downsample.reduction.weight_quantizer", "head.fc.weight_quantizer"} <= slots
    assert sqnr_to_float(qmodel, images) > 20  # W8A8 on a random model: the logits stay close to float
    # a 2-bit softmax, so that switching it off visibly moves the logits
    coarse = vitq.quantize(model, vitq.QuantConfig(method="percentile", calib_size=4, overrides=[
        vitq.PointOverride.parse("*.attn.softmax=2")]), images, progress=False)
    softmaxes = [slot.quantizer for slot in coarse.slots() if slot.point.endswith("attn.softmax")]
    assert len(softmaxes) == 4
    quantized = coarse(images)
    for quantizer in softmaxes:
        quantizer.enabled = False
    assert not torch.allclose(coarse(images), quantized, rtol=1e-3, atol=0)


def test_save_and_load_a_swin_bit_identically(swin_folders, tmp_path):
    name = f"hf:{swin_folders['shifted', 'SwinForImageClassification']}"
    assert_saves_and_loads_bit_identically(name, tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    ({"use_absolute_embeddings": True}, "absolute position embeddings"),
    ({"image_size": 24}, "stage 1's 6x6 tokens are not whole 4x4 windows"),
    ({"window_size": 32}, "stage 0's 16x16 tokens are not whole 32x32 windows"),
    ({"image_size": 33}, "image size 33 is not a multiple of the patch size 2"),
    ({"image_size": [32, 48]}, "'image_size' must be a int"),
    ({"num_heads": [1, 2, 4]}, "2 stage depths but 3 stage head counts"),
    ({"depths": [2, 0]}, "'depths' must be a list of positive ints"),
    ({"hidden_act": "relu"}, "activation 'relu'"),
    ({"architectures": ["SwinForMaskedImageModeling"]}, "SwinForMaskedImageModeling is not supported"),
])
def test_unsupported_swin_configs_are_one_line_errors(swin_folders, tmp_path, change, message):
    config = json.loads((swin_folders["shifted", "SwinModel"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(VitqError, match=message) as error:
        create_model(f"hf:{tmp_path}")
    assert "\n" not in str(error.value)


def test_a_missing_swin_tensor_is_one_line(swin_folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = swin_folders["three_stages", "SwinForImageClassification"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("swin.encoder.layers.1.downsample.reduction.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(VitqError, match="no tensor 'swin.encoder.layers.1.downsample.reduction.weight'"):
        create_model(f"hf:{tmp_path}")
