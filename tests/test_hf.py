"""Tests of vitq.models.hf: transformers ViT/DeiT checkpoints read into the equivalent timm model, checked against
transformers itself (its SDPA and eager attention), their preprocessing, quantization on the softmax path,
save/load, ``vitq convert --to hf`` and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from helpers import assert_saves_and_loads_bit_identically, random_images, sqnr_to_float, write_images
from PIL import Image

import vitq
from vitq.cli import main
from vitq.data.transforms import transform_for_model
from vitq.errors import VitqError
from vitq.models.hf import data_config, write_hf_folder
from vitq.models.registry import create_model

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "image_size": 32, "patch_size": 8, "num_labels": 10}
CLASSES = {"ViTForImageClassification": transformers.ViTConfig, "ViTModel": transformers.ViTConfig,
           "DeiTForImageClassificationWithTeacher": transformers.DeiTConfig,
           "CLIPVisionModel": transformers.CLIPVisionConfig,
           "CLIPVisionModelWithProjection": transformers.CLIPVisionConfig}


def _hf_reference(folder, attention: str):
    """transformers' own model of ``folder`` with the given attention implementation."""
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(folder, attn_implementation=attention).eval()


def _outputs(model, x: torch.Tensor) -> torch.Tensor:
    """What the timm model returns: the logits, CLIP's image embedding or pooled output, or the class token."""
    result = model(pixel_values=x)
    names = ("image_embeds", "pooler_output") if type(model).__name__.startswith("CLIP") else ("logits",)
    for name in names:
        if getattr(result, name, None) is not None:
            return getattr(result, name)
    return result.last_hidden_state[:, 0]  # ViTModel / DeiTModel: the class token (their pooler is not read)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A small random transformers checkpoint per supported architecture (seeded), saved by transformers."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for i, (name, config_cls) in enumerate(CLASSES.items()):
        torch.manual_seed(i)
        extra = {"projection_dim": 16} if name.startswith("CLIP") else {}
        model = getattr(transformers, name)(config_cls(**SMALL, **extra, layer_norm_eps=1e-6 if i else 1e-12))
        folders[name] = root / name
        model.save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("architecture", list(CLASSES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_read_model_computes_what_transformers_computes(hf_folders, architecture, attention):
    model = create_model(f"hf:{hf_folders[architecture]}")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = _outputs(_hf_reference(hf_folders[architecture], attention), x)
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert model.pretrained_cfg["architecture"] == architecture


@torch.no_grad()
def test_a_whole_clip_model_reads_as_its_image_tower_and_projection(tmp_path):
    torch.manual_seed(0)
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {k: v for k, v in SMALL.items() if k != "num_labels"}
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    clip.eval().save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = clip.get_image_features(pixel_values=x)
    features = features if torch.is_tensor(features) else features.pooler_output
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("hidden_act", "layer_norm_eps"):  # hub configs leave out what equals the defaults
        config["vision_config"].pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = create_model(f"hf:{tmp_path}")
    torch.testing.assert_close(model(x), features, rtol=1e-5, atol=1e-5 * float(features.abs().max()))
    assert model.num_classes == 16 and not hasattr(model, "head_dist")


@torch.no_grad()
def test_quantized_hf_model_keeps_timm_point_names_and_its_softmax_quantizer_is_on_the_path(hf_folders):
    name = f"hf:{hf_folders['DeiTForImageClassificationWithTeacher']}"
    model = create_model(name)
    images = random_images(4, size=32)
    qmodel = vitq.quantize(model, vitq.QuantConfig(method="percentile", calib_size=4), images, progress=False)
    slots = {slot.name for slot in qmodel.slots()}
    assert {"blocks.1.attn.softmax.quantizer", "blocks.0.attn.qkv.weight_quantizer",
            "head.weight_quantizer", "head_dist.weight_quantizer"} <= slots
    assert sqnr_to_float(qmodel, images) > 20  # W8A8 on a random model: the logits stay close to float
    # a 2-bit softmax (HF's small initial weights leave the attention nearly uniform: 8 bits barely move it)
    coarse = vitq.quantize(model, vitq.QuantConfig(method="percentile", calib_size=4, overrides=[
        vitq.PointOverride.parse("blocks.*.attn.softmax=2")]), images, progress=False)
    softmaxes = [slot.quantizer for slot in coarse.slots() if slot.point.endswith("attn.softmax")]
    assert len(softmaxes) == 2
    quantized = coarse(images)
    for quantizer in softmaxes:
        quantizer.enabled = False
    assert not torch.allclose(coarse(images), quantized, rtol=1e-3, atol=0)  # SDPA would leave it unchanged


def test_save_and_load_an_hf_model_bit_identically(hf_folders, tmp_path):
    name = f"hf:{hf_folders['ViTForImageClassification']}"
    assert_saves_and_loads_bit_identically(name, tmp_path)


@pytest.mark.parametrize("kind", ["vit", "clip", "convnext"])
def test_preprocessing_follows_the_image_processor(kind, tmp_path):
    """Our transform from the processor's config gives transformers' pixels, up to one grey level of a few pixels
    (the resize implementations round apart)."""
    processor = {"vit": transformers.ViTImageProcessor(size={"height": 48, "width": 48}, resample=3),
                 "clip": transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size=32, resample=3,
                                                         image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]),
                 "convnext": transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.8,
                                                                 resample=2)}[kind]
    processor.save_pretrained(tmp_path)
    config = data_config(json.loads((tmp_path / "preprocessor_config.json").read_text()), "test", 224)
    model = torch.nn.Identity()
    model.pretrained_cfg = config
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (57, 71, 3), dtype=np.uint8))
    ours = transform_for_model(model)(image)
    theirs = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
    assert ours.shape == theirs.shape
    level = 1 / 255 / min(config["std"])
    assert float((ours - theirs).abs().max()) <= 2.5 * level
    assert float((ours - theirs).abs().mean()) <= 0.1 * level


@pytest.mark.parametrize(("processor_type", "square"), [
    ("ViTImageProcessor", True), ("ViTFeatureExtractor", True), ("CLIPImageProcessor", False),
    ("ConvNextImageProcessorFast", False)])
def test_a_plain_number_size_means_what_its_processor_reads(processor_type, square):
    """Older configs write ``"size": 224``: ViT's processor squashes to 224×224, CLIP's resizes the shortest edge
    (transformers' ``default_to_square`` of each processor)."""
    key = "feature_extractor_type" if processor_type.endswith("FeatureExtractor") else "image_processor_type"
    config = data_config({key: processor_type, "size": 40}, "test", 224)
    assert config["input_size"] == (3, 40, 40)
    assert config["crop_mode"] == ("squash" if square else "center")


def test_timm_models_convert_to_folders_transformers_reads(tmp_path):
    torch.manual_seed(0)
    distilled = timm.models.deit.VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                            num_heads=2, num_classes=5).eval()
    distilled.pretrained_cfg = {"input_size": (3, 32, 32)}  # without one, timm's data config says 224
    for model, folder in ((timm.create_model("test_vit", pretrained=False).eval(), tmp_path / "vit"),
                          (distilled, tmp_path / "deit")):
        write_hf_folder(model, folder)
        size = model.patch_embed.img_size[0]
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(_outputs(_hf_reference(folder, "sdpa"), x), expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(create_model(f"hf:{folder}")(x), expected)
        assert create_model(f"hf:{folder}").pretrained_cfg["input_size"] == (3, size, size)


def test_cli_converts_and_evaluates_through_the_hf_folder(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = tmp_path / "test_vit.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}, str(checkpoint))
    data = write_images(tmp_path / "images", 6)
    folder = tmp_path / "hf"
    assert main(["convert", "--to", "hf", "--model", "test_vit", "--checkpoint", str(checkpoint), "--output",
                 str(folder)]) == 0
    assert "hf:" in capsys.readouterr().out
    results = []
    for model in (["--model", "test_vit", "--checkpoint", str(checkpoint)], ["--model", f"hf:{folder}"]):
        out = tmp_path / f"{len(results)}.json"
        assert main(["eval", *model, "--data", str(data), "--calib-size", "2", "--method", "percentile",
                     "--workers", "0", "--threads", "1", "--no-progress", "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["top1"] == results[1]["top1"] and results[0]["n_images"] == results[1]["n_images"] == 4
    assert main(["convert", "--to", "hf", "--model", "test_vit", "--checkpoint", str(checkpoint), "--output",
                 str(folder)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_hf_inputs_are_one_line_errors(hf_folders, tmp_path):
    with pytest.raises(VitqError, match="no such folder"):
        create_model(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(VitqError, match="drop --checkpoint"):
        create_model(f"hf:{hf_folders['ViTModel']}", checkpoint=tmp_path / "x.safetensors")
    folder = tmp_path / "other"
    folder.mkdir()
    with pytest.raises(VitqError, match="no config.json"):
        create_model(f"hf:{folder}")
    config = json.loads((hf_folders["ViTModel"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "swinv2"}))
    with pytest.raises(VitqError, match="model type 'swinv2' is not supported"):
        create_model(f"hf:{folder}")
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["ViTForMaskedImageModeling"]}))
    with pytest.raises(VitqError, match="ViTForMaskedImageModeling is not supported"):
        create_model(f"hf:{folder}")
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(VitqError, match="activation 'relu'"):
        create_model(f"hf:{folder}")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((hf_folders["ViTModel"] / "model.safetensors").read_bytes())
    state = create_model(f"hf:{folder}").state_dict()
    assert state  # the copy reads; now drop a tensor
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("encoder.layer.1.output.dense.weight")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(VitqError, match="no tensor 'encoder.layer.1.output.dense.weight'"):
        create_model(f"hf:{folder}")
    with pytest.raises(VitqError, match="only the plain ViT/DeiT layout"):
        write_hf_folder(timm.create_model("test_vit", pretrained=False, reg_tokens=4), tmp_path / "r")
    with pytest.raises(VitqError, match="only timm ViT/DeiT models"):
        write_hf_folder(torch.nn.Linear(2, 2), tmp_path / "l")


def test_a_hub_name_without_the_hub_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(VitqError, match="could not download 'nobody/no-such-vit'.*hf:<folder"):
        create_model("hf:nobody/no-such-vit")
    with pytest.raises(VitqError, match="needs a folder or a hub name"):
        create_model("hf:")
