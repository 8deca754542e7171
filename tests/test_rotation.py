"""Tests of vitq.models.rotation: Hadamard matrices, the exactness of the rotated float model (ViT, DeiT with
LayerScale, distilled DeiT), its use through QuantConfig.rotate (save/load, determinism) and its refusals."""

import copy

import pytest
import timm
import torch
from helpers import random_images, random_test_vit, randomize_norms

import vitq
from vitq.errors import VitqError
from vitq.models.rotation import hadamard, random_hadamard, rotate_vit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n", [1, 2, 12, 20, 24, 40, 64, 192, 384, 768])
def test_hadamard_matrices_are_orthogonal_with_unit_entries(n):
    h = hadamard(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q = random_hadamard(n, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_unsupported_hadamard_size_is_refused():
    with pytest.raises(VitqError, match="no Hadamard matrix of size 36"):
        hadamard(36)


def _random_affine(model: torch.nn.Module) -> torch.nn.Module:
    """Norm gains/biases and LayerScale gammas far from their init, so that every fold is exercised."""
    model = randomize_norms(model)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.uniform_(0.1, 1.0, generator=torch.Generator().manual_seed(1))
    return model.eval()


def _small(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return _random_affine(timm.create_model(name, pretrained=False, depth=2, **kwargs))


@pytest.mark.parametrize("build", [
    lambda: _random_affine(random_test_vit()),
    lambda: _small("deit_tiny_patch16_224"),  # width 192 = 12·16: the Paley factor
    lambda: _small("deit_tiny_distilled_patch16_224"),  # two heads reading the final norm
    lambda: _small("deit_tiny_patch16_224", init_values=0.1),  # LayerScale folded into the writers
], ids=["test_vit", "deit_tiny", "deit_tiny_distilled", "layerscale"])
def test_rotated_float_model_computes_the_original(build):
    model = build()
    size = model.pretrained_cfg["input_size"][1]
    images = random_images(2, size)
    rotated = rotate_vit(copy.deepcopy(model), seed=3)
    assert isinstance(rotated.blocks[0].norm1, torch.nn.RMSNorm) and isinstance(rotated.norm, torch.nn.RMSNorm)
    with torch.no_grad():
        reference, out = model(images), rotated(images)
    assert float((out - reference).abs().max() / reference.abs().max()) < 1e-5
    # the residual stream is rotated: the first writer's weights differ from the original's
    assert not torch.allclose(rotated.patch_embed.proj.weight, model.patch_embed.proj.weight, atol=1e-3)


def test_rotation_spreads_a_residual_outlier_channel():
    """One residual channel 50x larger than the rest: after rotation no channel holds more than a few times the
    mean energy (the Hadamard matrix spreads a coordinate evenly over all channels)."""
    model = _random_affine(random_test_vit())
    with torch.no_grad():
        model.patch_embed.proj.weight[5] *= 50
        model.patch_embed.proj.bias[5] *= 50
    outputs = {}
    for key, m in (("original", model), ("rotated", rotate_vit(copy.deepcopy(model), seed=0))):
        with torch.no_grad():
            energy = m.patch_embed(random_images(2)).square().mean((0, 1))
        outputs[key] = float(energy.max() / energy.mean())
    assert outputs["original"] > 20 and outputs["rotated"] < 4, outputs


def test_quant_config_rotate_quantizes_the_rotated_model_and_reloads(float_model, tmp_path):
    model = _random_affine(copy.deepcopy(float_model))
    images = random_images(4)
    config = vitq.QuantConfig(method="percentile", w_bits=8, a_bits=8, calib_size=4, rotate=True, seed=2)
    qmodel = vitq.quantize(model, config, images, progress=False)
    assert isinstance(qmodel.model.blocks[0].norm1, torch.nn.RMSNorm)
    assert not qmodel.norm_linear_pairs()  # no LayerNorm affine left for a reparameterization fold
    with torch.no_grad():
        reference = model(images)
        with qmodel.quantization_disabled():
            assert float((qmodel(images) - reference).abs().max() / reference.abs().max()) < 1e-5
        quantized = qmodel(images)
    again = vitq.quantize(model, config, images, progress=False)
    torch.testing.assert_close(again.model.blocks[0].attn.qkv.weight, qmodel.model.blocks[0].attn.qkv.weight,
                               rtol=0, atol=0)  # same seed, same rotation
    vitq.save(qmodel, tmp_path / "m.safetensors")
    loaded = vitq.load(tmp_path / "m.safetensors")
    assert loaded.config.rotate
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), quantized, rtol=0, atol=0)
    assert "rotate" not in vitq.QuantConfig().model_dump()  # configs without rotation serialize as before


def test_rotation_refuses_what_it_cannot_keep_exact():
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=(1, 1),
                             num_heads=(1, 2))
    with pytest.raises(VitqError, match="implemented for ViT/DeiT, not the swin family"):
        vitq.prepare(swin, vitq.QuantConfig(rotate=True))
    clip_like = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, pre_norm=True)
    with pytest.raises(VitqError, match="rotation is exact only for plain ViT/DeiT blocks; this model has norm_pre"):
        vitq.prepare(clip_like, vitq.QuantConfig(rotate=True))
    siglip_like = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, class_token=False,
                                    global_pool="map")
    with pytest.raises(VitqError, match="this model has attn_pool"):
        vitq.prepare(siglip_like, vitq.QuantConfig(rotate=True))
    wide_head = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    wide_head.head = torch.nn.Linear(2 * wide_head.embed_dim, 10)  # a head on two tokens' features
    with pytest.raises(VitqError, match="a head reading 384 features, not one token's"):
        vitq.prepare(wide_head, vitq.QuantConfig(rotate=True))
